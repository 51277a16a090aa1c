"""OpticalMemory: the middleware a chatbot backend or an agent framework calls.

The turn log in the store is the source of truth. Everything else is derived
from it on demand: pages (sealed when full, see `pages`), the plan of the
context (see `policy` and `plan`), the prompt a model reads (see `prompt`),
page images and their vision tokens (see `cache`). Only `ask`, `stream` and
`context` need a model (a `Backend`, see `backends`); the local DeepSeek-OCR
model is imported on first use, so the memory itself needs no torch.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import unicodedata
import uuid
from collections.abc import Collection, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image
from tqdm import tqdm

from optical_memory.backends import Answer, Backend, Profile, Tier, get_profile, open_backend
from optical_memory.backends.profiles import deepseek_ocr_profile
from optical_memory.cache import VisionCache, cache_key, encode_png, page_image_key
from optical_memory.fox import page_precision
from optical_memory.messages import (
    IMAGE_SLOT,
    MAX_IMAGE_BYTES,
    Message,
    MessageError,
    parse_message,
    surrogate_error,
)
from optical_memory.modes import FADING_ORDER
from optical_memory.pages import Pager, PageRecord
from optical_memory.plan import TEXT, PagePlan, Plan, Recalled
from optical_memory.policy import Policy, solve
from optical_memory.prompt import (
    Prompt,
    PromptPage,
    format_query,
    format_turns,
    page_label,
    recalled_label,
)
from optical_memory.recall import (
    RECALL_LABEL_TOKENS,
    TURN_TEXT_OVERHEAD,
    Candidate,
    PageFacts,
    choose,
)
from optical_memory.search import Hit
from optical_memory.stores import CacheLimits, NewTurn, Store, Turn, open_store
from optical_memory.stores.base import StoreUnavailableError, TurnConflictError, same_turn
from optical_memory.tokens import TokenCounter, default_counter
from optical_memory.transfer import read_jsonl, write_jsonl
from renderers import RenderConfig, Renderer

if TYPE_CHECKING:
    import torch

    from optical_memory.backends.deepseek_ocr.backend import Context, DeepSeekOCRBackend

MAX_ID_CHARS = 256
PINNED_ROLES = ("system", "developer")  # always text, first in every context


def answer_id_for(question_id: str) -> str:
    """The answer's turn id, derived from the question's, so a retried `ask` stores it once."""
    derived = f"{question_id}/answer"
    if len(derived) <= MAX_ID_CHARS:
        return derived
    return "answer-" + hashlib.sha256(question_id.encode()).hexdigest()[:48]


class PinnedOverflowError(ValueError):
    """The pinned turns alone do not fit the window."""


class UnknownSessionError(LookupError):
    """A session that holds no turns."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown session"


def check_id(value: object, what: str) -> str:
    """A session or turn id: a string of 1..256 characters with no control characters.

    Any other character is allowed: stores hash ids into keys, so no id can reach
    another session's data.
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_CHARS:
        raise ValueError(f"{what} must have 1 to {MAX_ID_CHARS} characters, got {len(value)}")
    bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        raise ValueError(f"{what} {value!r} contains the control character {bad!r}")
    return value


@dataclass(frozen=True)
class Stats:
    """Sizes and counters of one session."""

    session_id: str
    turns: int
    pages_sealed: int
    pages_by_mode: dict[str, int]
    cache_entries: int
    cache_bytes: int
    cache_hits: int
    cache_misses: int
    turn_bytes: int

    def table(self) -> str:
        modes = ", ".join(f"{m} {n}" for m, n in self.pages_by_mode.items())
        return "\n".join(
            [
                f"session {self.session_id!r}",
                f"turns          {self.turns:,} ({self.turn_bytes:,} bytes of text)",
                f"pages sealed   {self.pages_sealed:,}",
                f"pages by tier  {modes}",
                (
                    f"cache          {self.cache_entries:,} entries, {self.cache_bytes:,} bytes, "
                    f"{self.cache_hits:,} hits, {self.cache_misses:,} misses"
                ),
            ]
        )


class OpticalMemory:
    """Chat memory whose old turns become page images that fade with age.

    `store`: None for the embedded SQLite file, a path, `sqlite:///path`,
    `redis://host:port/db`, or a Store. `model`: the backend that reads the
    memory: a `Backend` (e.g. `OpenAIBackend(...)`), a spec for `open_backend`
    (a DeepSeek-OCR checkpoint directory, loaded on first use, or
    "NAME:ARGUMENT"), or a loaded DeepSeek-OCR model. Without a model, `profile`
    (a name from `optical_memory.backends.PROFILES` or a `Profile`; default
    DeepSeek-OCR) says how pages are counted and sent by `messages`. `device`
    and `dtype` go to the local DeepSeek-OCR backend. `render`: the page geometry
    (default: `RenderConfig.memory_page()`, the 1280x1280 Gundam canvas).
    `max_content_chars` bounds one turn's render text (its text, tool calls and
    placeholders); `max_image_bytes` bounds each data-URL image of a message (decoded;
    Pillow's pixel limit `PIL.Image.MAX_IMAGE_PIXELS` guards against decompression bombs).
    """

    def __init__(
        self,
        store: str | os.PathLike | Store | None = None,
        *,
        model: str | os.PathLike | Backend | Any | None = None,
        profile: str | Profile | None = None,
        device: str | None = None,
        dtype: str | None = None,
        render: RenderConfig | None = None,
        policy: Policy | None = None,
        cache: CacheLimits | None = None,
        max_content_chars: int = 200_000,
        max_image_bytes: int = MAX_IMAGE_BYTES,
    ):
        self.policy = policy or Policy()
        self.backend = _open_model(model, device, dtype)
        if self.backend is not None and profile is not None:
            raise ValueError("pass profile= only without model=: a backend counts with its own")
        self._profile = get_profile(profile) if profile is not None else None
        self.max_content_chars = max_content_chars
        self.max_image_bytes = max_image_bytes
        self._render_config = render or RenderConfig.memory_page()
        self._pager: Pager | None = None
        self._recounted: dict[tuple[str, str], int] = {}  # (page hash, counter) -> text tokens
        # per session: (turns scanned, id of the last one, indexes of system/developer turns)
        self._role_pins: dict[str, tuple[int, str, list[int]]] = {}
        self.store = open_store(store, cache=cache)
        self.cache = VisionCache(self.store)

    def __enter__(self) -> OpticalMemory:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the model and how it counts -----------------------------------------------
    @property
    def profile(self) -> Profile:
        """How the reading model counts: the backend's profile, else the one given, else
        DeepSeek-OCR's with the policy's window."""
        if self.backend is not None:
            return self.backend.profile
        return self._profile or deepseek_ocr_profile(self.policy.window)

    @property
    def tiers(self) -> dict[str, Tier]:
        """Tier -> geometry and cost of one page of this memory's canvas."""
        canvas = (self._render_config.width, self._render_config.height)
        if self.backend is not None:
            return self.backend.tiers(canvas)
        return self.profile.tiers(canvas)

    @property
    def model(self) -> Any:
        """The local DeepSeek-OCR model, loaded on first use; ValueError for any other backend."""
        return self._local_backend().model

    def _local_backend(self) -> DeepSeekOCRBackend:
        from optical_memory.backends.deepseek_ocr.backend import DeepSeekOCRBackend

        if not isinstance(self.backend, DeepSeekOCRBackend):
            raise ValueError(  # noqa: TRY004 (a configuration error, not a wrong argument type)
                "this OpticalMemory has no local model: pass model=<DeepSeek-OCR checkpoint dir>"
            )
        return self.backend

    @property
    def counter(self) -> TokenCounter:
        """The backend's token counter, else the tiktoken estimate."""
        return self.backend.counter if self.backend is not None else default_counter()

    @property
    def window(self) -> int:
        return self.profile.window

    @property
    def pager(self) -> Pager:
        if self._pager is None:
            # pages are always measured with the default counter, so every process agrees
            self._pager = Pager(self.store, Renderer(self._render_config))
        return self._pager

    @property
    def render_config(self) -> RenderConfig:
        return self._render_config

    # --- the turn log ---------------------------------------------------------------
    def _new_turn(self, message: Any, turn_id: object, where: str) -> NewTurn:
        """The turn to store for a message: checked whole (shape, valid Unicode, the size of
        its render text and of its images); `turn_id` None: the message's own "turn_id", else
        a new one. A message's "created_at" is the turn's time (else the time of the append)."""
        msg = parse_message(message, where)
        text = msg.text
        if len(text) > self.max_content_chars:
            raise MessageError(
                f"{where}: content has {len(text):,} characters, over the limit of "
                f"{self.max_content_chars:,} (max_content_chars)"
            )
        msg.check_images(where, self.max_image_bytes)
        if turn_id is None:
            turn_id = msg.turn_id
        problem = surrogate_error(turn_id) if isinstance(turn_id, str) else None
        if problem:
            raise MessageError(f"{where}: turn id {turn_id!r} {problem}")
        tid = uuid.uuid4().hex if turn_id is None else check_id(turn_id, f"{where}: turn id")
        return NewTurn(tid, msg.role, text, msg.json, msg.created(where))

    def append(
        self,
        session_id: str,
        role: str,
        content: Any,
        turn_id: str | None = None,
        **fields: Any,
    ) -> Turn:
        """Store one turn durably before returning; a retry with the same turn id stores nothing
        twice. `content` and `fields` as in the OpenAI message format, e.g.
        `append(sid, "assistant", None, tool_calls=[...])`, `append(sid, "tool", "42",
        tool_call_id="call_1")`."""
        check_id(session_id, "session id")
        new = self._new_turn({"role": role, "content": content, **fields}, turn_id, "turn")
        try:
            return self.store.append(session_id, [new])[0]
        except StoreUnavailableError as exc:
            raise _with_turn_ids(exc, [new]) from exc

    def extend(
        self,
        session_id: str,
        messages: Iterable[Message | Mapping[str, Any]],
        turn_ids: Sequence[str] | None = None,
    ) -> list[Turn]:
        """Append a history in one atomic batch; every message is checked before anything is stored.

        Messages are OpenAI-format dicts (or `Message`s) of any shape; each is stored as
        given and comes back byte for byte (`turns()`, `export_jsonl`). A message may carry
        its own "turn_id", an instruction rather than part of the message: the id that makes
        a retry idempotent (the same id with the same message stores nothing twice, with a
        different one is a `TurnConflictError`); `turn_ids` gives them all at once.
        """
        check_id(session_id, "session id")
        messages = list(messages)
        if turn_ids is not None and len(turn_ids) != len(messages):
            raise ValueError(f"{len(turn_ids)} turn ids for {len(messages)} messages")
        new: list[NewTurn] = []
        first: dict[str, int] = {}
        for i, m in enumerate(messages):
            tid = turn_ids[i] if turn_ids is not None else None
            new.append(self._new_turn(m, tid, f"message {i}"))
            j = first.setdefault(new[i].turn_id, i)
            if j != i and not _same_new(new[j], new[i]):
                raise TurnConflictError(
                    f"message {i}: turn id {new[i].turn_id!r} is also the id of message {j} "
                    "of this batch, with different content; nothing was stored"
                )
        try:
            return self.store.append(session_id, new) if new else []
        except StoreUnavailableError as exc:
            raise _with_turn_ids(exc, new) from exc

    def _require(self, session_id: str, new_ok: bool = False) -> int:
        check_id(session_id, "session id")
        count = self.store.turn_count(session_id)
        if count == 0 and not new_ok:
            raise UnknownSessionError(f"unknown session {session_id!r}: it holds no turns")
        return count

    def turns(self, session_id: str, start: int = 0, stop: int | None = None) -> list[Turn]:
        """The stored turns with start <= index < stop (stop None: to the end)."""
        self._require(session_id)
        return self.store.turns(session_id, start, stop)

    def sessions(self) -> list[str]:
        return self.store.sessions()

    def pin(self, session_id: str, turn_id: str) -> None:
        """Keep a turn as text at the start of every context, like system and developer turns.

        A turn already on a sealed page stays there too (pages never change)."""
        self.store.set_pinned(session_id, self._index_of(session_id, turn_id), True)

    def unpin(self, session_id: str, turn_id: str) -> None:
        """Undo `pin`; system and developer turns stay pinned by their role."""
        self.store.set_pinned(session_id, self._index_of(session_id, turn_id), False)

    def index_of(self, session_id: str, turn_id: str) -> int | None:
        """The index of the session's turn with this id, None if it has none."""
        check_id(session_id, "session id")
        return self.store.index_of(session_id, check_id(turn_id, "turn id"))

    def _index_of(self, session_id: str, turn_id: str) -> int:
        self._require(session_id)
        index = self.index_of(session_id, turn_id)
        if index is None:
            raise LookupError(f"session {session_id!r} has no turn with id {turn_id!r}")
        return index

    def pinned(self, session_id: str) -> list[int]:
        """Indexes of the turns kept as text first: system and developer turns, and pins."""
        return self._pinned(session_id, self._require(session_id))

    def _pinned(self, session_id: str, count: int) -> list[int]:
        scanned, last_id, by_role = self._role_pins.get(session_id, (0, "", []))
        fresh = self.store.turns(session_id, max(0, scanned - 1), count) if scanned <= count else []
        if scanned and (not fresh or fresh[0].turn_id != last_id):  # re-created elsewhere
            scanned, by_role = 0, []
            fresh = self.store.turns(session_id, 0, count)
        new = fresh[1:] if scanned else fresh
        by_role = by_role + [t.index for t in new if t.role in PINNED_ROLES]
        if fresh:
            self._role_pins[session_id] = (count, fresh[-1].turn_id, by_role)
        explicit = [i for i in self.store.pinned(session_id) if i < count]
        return sorted({*by_role, *explicit})

    def delete(self, session_id: str) -> bool:
        """Remove a session, its pages and its cache entries; False if it did not exist."""
        check_id(session_id, "session id")
        if self._pager is not None:
            self._pager.forget(session_id)
        self._role_pins.pop(session_id, None)
        return self.store.delete(session_id)

    def export_jsonl(self, session_id: str, path: str | os.PathLike) -> int:
        """Write the session as JSONL, one message a line exactly as it was given, its
        "turn_id" added as the last field; returns the number of turns. Importing the file
        and exporting again gives the same bytes."""
        return write_jsonl(self.turns(session_id), path)

    def import_jsonl(self, session_id: str, path: str | os.PathLike) -> list[Turn]:
        """Append the messages of a JSONL file (as written by export_jsonl, or any JSONL of
        OpenAI-format messages) in one batch; a UTF-8 byte order mark is skipped, invalid
        UTF-8 is an error naming the line.

        Lines with a "turn_id" are idempotent: importing the same file twice stores them once.
        """
        return self.extend(session_id, read_jsonl(path))

    # --- pages and plans ------------------------------------------------------------
    def _window_start(
        self, session_id: str, count: int, pinned: Collection[int] = ()
    ) -> tuple[int, list[Turn]]:
        recent = self.store.turns(session_id, max(0, count - self.policy.recent_turns), count)
        tokens = [
            0 if t.index in pinned else self.counter.count(f"{t.role}: {t.content}")
            for t in recent
        ]
        return count - len(recent) + self.policy.window_start(tokens, self.window), recent

    def pages(self, session_id: str, progress: bool = False) -> list[PageRecord]:
        """Seal the pages that are due; all pages of the session, the open one last.

        With `progress`, sealing goes in steps of 50 turns under a progress bar (the
        pages are the same: a full page does not depend on the turns after it). A session
        without turns has none (a question opening it reads no pages).
        """
        count = self._require(session_id, new_ok=True)
        pinned = self._pinned(session_id, count)
        start, _ = self._window_start(session_id, count, pinned)
        done = min(start, self.store.info(session_id).cursor) if progress else start
        with tqdm(total=start - done, desc="paging", unit="turn", disable=start - done < 100) as bar:
            for stop in range(done + 50, start, 50):
                self.pager.sync(session_id, stop, pinned)
                bar.update(50)
            sealed, open_page = self.pager.sync(session_id, start, pinned)
            bar.update(bar.total - bar.n)
        return sealed + ([open_page] if open_page else [])

    def plan(self, session_id: str, query: str | None = None, budget: int | None = None) -> Plan:
        """What the context holds for `query` now: pages and their modes, text, every token count.

        Needs no model: the backend's (or the profile's) window and tier costs, or
        DeepSeek-OCR's. `budget` overrides the window.
        """
        return self._plan(session_id, query, budget)[0]

    def _plan(
        self, session_id: str, query: str | None, budget: int | None, new_ok: bool = False
    ) -> tuple[Plan, list[PageRecord], list[Turn], list[Turn]]:
        """The plan, with what it was made from: the page records, the recent turns (pinned
        ones left out) and the pinned turns, so that `prompt` reads none of them again.
        `new_ok`: a session without turns plans as empty (a question that opens it)."""
        count = self._require(session_id, new_ok)
        pinned = self._pinned(session_id, count)
        start, recent = self._window_start(session_id, count, pinned)
        sealed, open_page = self.pager.sync(session_id, start, pinned)
        records = sealed + ([open_page] if open_page else [])
        text_start = max(records[-1].end if records else (0, 0), (start, 0))
        text_turns = _unpinned(recent[text_start[0] - (count - len(recent)) :], pinned, text_start)
        text_tokens = self.counter.count(format_turns(text_turns, text_start[1])) if text_turns else 0
        pinned_turns = self._turns_at(session_id, pinned)
        pinned_tokens = self.counter.count(format_turns(pinned_turns)) if pinned_turns else 0
        query_tokens = self.counter.count(format_query(query)) if query else 0
        window = budget if budget is not None else self.window
        if pinned_tokens > window:
            raise PinnedOverflowError(
                f"session {session_id!r}: the {len(pinned)} pinned turns alone take "
                f"{pinned_tokens} positions, over the {window}-position window: unpin turns "
                "or raise the budget"
            )
        tiers = self.tiers
        costs = {name: tier.cost for name, tier in tiers.items()}
        labels = self.profile.label_tokens
        policy = replace(self.policy, window=window)
        if policy.age_unit == "turns":
            ages = [float(count - 1 - r.last_turn) for r in records]
        else:
            now = time.time()
            ages = [max(0.0, now - r.newest_time) for r in records]
        fixed = (
            pinned_tokens + text_tokens + query_tokens + policy.answer_tokens + policy.overhead
        )
        page_tokens = self._page_tokens(session_id, records)
        recalled: list[Recalled] = []
        if policy.planner == "schedule":
            solution = solve(
                ages, page_tokens, {name: c + labels for name, c in costs.items()}, fixed, policy
            )
            modes, fits = solution.modes, solution.fits
            precisions = [
                page_precision(t, tiers[m].tokens) if m else 0.0
                for t, m in zip(page_tokens, modes)
            ]
            scores, raised = [0.0] * len(records), [False] * len(records)
        else:
            facts = [
                PageFacts(r.first_turn, r.last_turn, t, _text_cost(r, t, self.counter.name), age)
                for r, t, age in zip(records, page_tokens, ages)
            ]
            hits, candidates = self._recall(session_id, query, records, count, pinned, policy)
            recent = text_start, text_turns, text_tokens
            spend = max(0, window - fixed)
            for _ in range(4):  # count the recent text exactly; spend less if it is over
                choice = choose(policy, facts, tiers, labels, spend, hits, candidates)
                text_start, text_turns, text_tokens = recent
                if TEXT in choice.modes:  # the recent text begins on the first text page
                    text_start = records[choice.modes.index(TEXT)].start
                    later = self.store.turns(session_id, text_start[0], count)
                    text_turns = _unpinned(later, pinned, text_start)
                    text_tokens = self.counter.count(format_turns(text_turns, text_start[1]))
                over = fixed - recent[2] + text_tokens - window + sum(
                    costs[m] + labels for m in choice.modes if m in costs
                ) + sum(c.tokens for c in choice.recalled)
                if over <= 0 or TEXT not in choice.modes:
                    break
                spend = max(0, spend - over)
            modes, precisions = choice.modes, choice.precisions
            scores, raised = choice.scores, choice.raised
            recalled = [
                Recalled(c.hit.turn, next(r.index for r in records
                                          if r.first_turn <= c.hit.turn <= r.last_turn),
                         c.hit.score, c.tokens)
                for c in sorted(choice.recalled, key=lambda c: c.hit.turn)
            ]
            fits = True  # checked below against the plan's own total
        pages = [
            PagePlan(
                r.index, r.first_turn, r.last_turn, r.sealed, tokens, age, mode,
                costs.get(mode, 0), r.content_hash, r.newest_time,
                precision, score, up,
            )
            for r, tokens, age, mode, precision, score, up in zip(
                records, page_tokens, ages, modes, precisions, scores, raised
            )
        ]
        plan = Plan(
            session_id=session_id,
            turns=count,
            counter=self.counter.name,
            window=window,
            age_unit=policy.age_unit,
            pages=pages,
            text_start=text_start,
            text_tokens=text_tokens,
            query_tokens=query_tokens,
            answer_tokens=policy.answer_tokens,
            overhead=policy.overhead,
            fits=True,
            page_costs=costs,
            label_tokens=labels,
            pinned=tuple(pinned),
            pinned_tokens=pinned_tokens,
            recalled=tuple(recalled),
            planner=policy.planner,
        )
        plan = replace(plan, fits=fits and plan.total <= window)
        return plan, records, text_turns, pinned_turns

    def search(self, session_id: str, query: str, limit: int = 10) -> list[Hit]:
        """The session's turns that best match `query` (BM25 over the turn log), best first."""
        self._require(session_id)
        return self.store.search(session_id, query, limit)

    def _recall(
        self,
        session_id: str,
        query: str | None,
        records: Sequence[PageRecord],
        count: int,
        pinned: Collection[int],
        policy: Policy,
    ) -> tuple[list[Hit], list[Candidate]]:
        """The query's hits on the pages (those scoring at least `min_score` of the best), and
        those that may be restored verbatim with their cost as text."""
        if not query or not records or policy.recall_hits == 0:
            return [], []
        paged = records[-1].end[0] if records[-1].end[1] == 0 else records[-1].end[0] + 1
        # enough hits that the best `recall_hits` on pages remain after those that are text
        limit = policy.recall_hits + len(pinned) + count - paged
        found = [
            h for h in self.store.search(session_id, query, limit)
            if h.turn < paged and h.turn not in pinned
        ][: policy.recall_hits]
        if not found:
            return [], []
        hits = [h for h in found if h.score >= policy.min_score * found[0].score]
        if policy.verbatim_tokens == 0:
            return hits, []
        turns = {t.index: t for t in self._turns_at(session_id, sorted(h.turn for h in hits))}
        candidates = [
            Candidate(h, self.counter.count(format_turns([turns[h.turn]])) + RECALL_LABEL_TOKENS)
            for h in hits
        ]
        return hits, candidates

    def _turns_at(self, session_id: str, indexes: Sequence[int]) -> list[Turn]:
        """The turns at these indexes (ascending), one read per run of consecutive indexes."""
        out: list[Turn] = []
        i = 0
        while i < len(indexes):
            j = i
            while j + 1 < len(indexes) and indexes[j + 1] == indexes[j] + 1:
                j += 1
            out += self.store.turns(session_id, indexes[i], indexes[j] + 1)
            i = j + 1
        return out

    def _page_tokens(self, session_id: str, records: Sequence[PageRecord]) -> list[int]:
        """Text tokens of each page by this memory's counter (recounted once per process if the
        page was measured with another, e.g. the decoder's tokenizer once a model is loaded)."""
        name = self.counter.name
        todo = [
            r for r in records
            if r.counter != name and (r.content_hash, name) not in self._recounted
        ]
        if todo:
            turns = self.store.turns(session_id, todo[0].first_turn, todo[-1].last_turn + 1)
            for r in todo:
                texts = self.pager.text_of(r, turns[r.first_turn - todo[0].first_turn :])
                self._recounted[(r.content_hash, name)] = sum(self.counter.count(t) for t in texts)
        return [
            r.text_tokens if r.counter == name else self._recounted[(r.content_hash, name)]
            for r in records
        ]

    # --- the context as a model reads it --------------------------------------------
    def prompt(
        self, session_id: str, query: str | None = None, budget: int | None = None,
        *, new_ok: bool = False,
    ) -> Prompt:
        """The plan for `query` as a `Prompt`: pages in context with their tiers and labels,
        the recent turns, the query. Needs no model. `new_ok`: a session without turns is
        no error (its prompt holds only the query; `ask` and `stream` open sessions so)."""
        plan, records, kept, pinned_turns = self._plan(session_id, query, budget, new_ok)
        if not plan.fits:
            raise ValueError(
                f"session {session_id!r}: recent text ({plan.text_tokens}), query "
                f"({plan.query_tokens}) and answer reserve ({plan.answer_tokens}) exceed the "
                f"{plan.window}-position window even with every page out of the context"
            )
        tiers = self.tiers
        now = time.time()
        by_index = {r.index: r for r in records}
        pages = [
            PromptPage(p, by_index[p.index], tiers[p.mode], page_label(p, now))
            for p in plan.in_context()
        ]
        begun, offset = plan.text_start  # the first recent turn may have begun on a page
        recent = [(t.role, t.content[offset:] if t.index == begun else t.content) for t in kept]
        recent_messages = [
            {"role": t.role, "content": t.content[offset:].replace(IMAGE_SLOT, "[image]")}
            if t.index == begun and offset > 0
            else t.to_message()
            for t in kept
        ]
        recalled = self._turns_at(session_id, [r.turn for r in plan.recalled])
        return Prompt(
            session_id, plan, pages, recent, query, self,
            pinned=[(t.role, t.content) for t in pinned_turns],
            recent_messages=recent_messages,
            pinned_messages=[t.to_message() for t in pinned_turns],
            recalled=[
                (recalled_label(t.index, t.created, now), t.role, t.content) for t in recalled
            ],
        )

    def messages(
        self,
        session_id: str,
        query: str | None = None,
        budget: int | None = None,
        *,
        include_query: bool = True,
    ) -> list[dict[str, Any]]:
        """The context for `query` as OpenAI chat messages (JSON-serialisable dicts): pages in
        context as labelled PNG `image_url` parts at their tier's geometry, oldest first, then
        the recent turns, then the query. With `include_query=False` the query's positions are
        planned for but it is left out, for a caller that sends it itself. Needs no model."""
        return self.prompt(session_id, query, budget).messages(include_query)

    def page_image(self, session_id: str, page: PageRecord | PagePlan) -> Image.Image:
        """The page rendered at the configured canvas, from the cache or rendered (and cached) now."""
        record = self._record(session_id, page)
        key = page_image_key(record.content_hash, record.fingerprint)
        image = self.cache.get_image(session_id, key, size=(record.width, record.height))
        if image is None:
            image = self.pager.image(session_id, record)
            if record.sealed:
                self.cache.put_image(session_id, key, image)
        return image

    def _record(self, session_id: str, page: PageRecord | PagePlan) -> PageRecord:
        if isinstance(page, PageRecord):
            return page
        for record in self.pages(session_id):
            if record.index == page.index and record.content_hash == page.content_hash:
                return record
        raise LookupError(f"page {page.index} of session {session_id!r} is not in its pages now")

    def page_pngs(
        self, session_id: str, pages: Sequence[tuple[PageRecord, Tier]]
    ) -> list[str]:
        """Each (page, tier) as a base64 PNG at the tier's geometry, ready for a data URL: read
        from the cache in one round trip; a miss is rendered and cached (an open page too: its
        key is its content, so a later turn makes a new key, and the cache's limits evict
        what it left behind)."""
        keys = [
            cache_key(r.content_hash, r.fingerprint, f"png-{t.width}x{t.height}", "")
            for r, t in pages
        ]
        found = self.cache.get_pngs(session_id, keys)
        out = []
        for (record, tier), key in zip(pages, keys):
            if key not in found:
                image = self.page_image(session_id, record)
                if image.size != (tier.width, tier.height):
                    image = image.resize((tier.width, tier.height), Image.Resampling.LANCZOS)
                png = encode_png(image)
                self.cache.put_png(session_id, key, png, image.size)
                found[key] = base64.b64encode(png).decode("ascii")
            out.append(found[key])
        return out

    def context(
        self, session_id: str, query: str, budget: int | None = None, progress: bool = False
    ) -> Context:
        """DeepSeek-OCR decoder inputs for `query`: page embeddings (cached or encoded now),
        recent text, query. Needs the local backend."""
        backend = self._local_backend()
        return backend.context(self.prompt(session_id, query, budget), progress=progress)

    def encode_pages(
        self, session_id: str, plan: Plan, progress: bool = False, batch_size: int = 8
    ) -> tuple[list[torch.Tensor], int]:
        """Vision tokens of the plan's pages in context, oldest first (local backend); encodes
        only cache misses, in batches of up to `batch_size` pages of one mode."""
        return self._local_backend().encode_pages(self, session_id, plan, progress, batch_size)

    # --- answers --------------------------------------------------------------------
    def _question(
        self, session_id: str, query: str, max_new_tokens: int | None, turn_id: str | None
    ) -> tuple[NewTurn, str, Answer | None]:
        """The question turn, its answer's turn id, and the answer if a retry finds it stored."""
        if self.backend is None:
            raise ValueError("this OpticalMemory has no model: pass model=<backend or checkpoint>")
        question = self._new_turn({"role": "user", "content": query}, turn_id, "query")
        answer_id = answer_id_for(question.turn_id)
        index = self.store.index_of(session_id, answer_id) if turn_id is not None else None
        if index is None:
            return question, answer_id, None
        stored = self.store.turns(session_id, index, index + 1)[0]
        return question, answer_id, Answer(
            stored.content, self.backend.name, "", question_id=question.turn_id,
            answer_id=answer_id,
        )

    def _prompt_for(self, session_id: str, query: str, max_new_tokens: int | None) -> tuple[Prompt, int]:
        answer_tokens = max_new_tokens or self.policy.answer_tokens
        # a longer answer than the policy reserves takes its extra positions from the pages
        budget = self.window - max(0, answer_tokens - self.policy.answer_tokens)
        return self.prompt(session_id, query, budget=budget, new_ok=True), answer_tokens

    def _store_answer(
        self, session_id: str, question: NewTurn, answer_id: str, answer: Answer, prompt: Prompt
    ) -> Answer:
        reply = self._new_turn({"role": "assistant", "content": answer.text}, answer_id, "answer")
        self.store.append(session_id, [question, reply])
        return replace(
            answer, question_id=question.turn_id, answer_id=answer_id,
            positions=prompt.plan.positions(), plan=prompt.plan,
        )

    def ask(
        self,
        session_id: str,
        query: str,
        max_new_tokens: int | None = None,
        turn_id: str | None = None,
        **options: Any,
    ) -> Answer:
        """Answer `query` from the session's memory with the backend, then append the question
        and the answer as turns; the `Answer` holds their turn ids and the context's positions
        by kind. Nothing is stored when the backend fails (`BackendError`). Retried with the
        same `turn_id`, the stored answer comes back and nothing is asked or stored twice.
        `options` go to the backend (sampling settings; `progress` for the local one)."""
        question, answer_id, stored = self._question(session_id, query, max_new_tokens, turn_id)
        if stored is not None:
            return stored
        prompt, answer_tokens = self._prompt_for(session_id, query, max_new_tokens)
        answer = self.backend.answer(prompt, max_tokens=answer_tokens, **options)
        return self._store_answer(session_id, question, answer_id, answer, prompt)

    def stream(
        self,
        session_id: str,
        query: str,
        max_new_tokens: int | None = None,
        turn_id: str | None = None,
        **options: Any,
    ) -> Generator[str, None, Answer]:
        """`ask`, yielding the answer in pieces; the turns are appended once it is complete.
        The generator's return value (`StopIteration.value`) is the `Answer`, as from `ask`."""
        question, answer_id, stored = self._question(session_id, query, max_new_tokens, turn_id)
        if stored is not None:
            yield stored.text
            return stored
        prompt, answer_tokens = self._prompt_for(session_id, query, max_new_tokens)
        stream = self.backend.stream(prompt, max_tokens=answer_tokens, **options)
        pieces = []
        for piece in stream:
            pieces.append(piece)
            yield piece
        answer = stream.answer or Answer("".join(pieces), self.backend.name, "")
        return self._store_answer(session_id, question, answer_id, answer, prompt)

    def stats(self, session_id: str) -> Stats:
        """Turns, pages per mode now, cache use of a session."""
        plan = self.plan(session_id)
        info = self.store.info(session_id)
        by_mode = {m: 0 for m in (TEXT, *FADING_ORDER, "out")}
        for p in plan.pages:
            by_mode[p.mode or "out"] += 1
        return Stats(
            session_id, info.turns, sum(p.sealed for p in plan.pages), by_mode,
            info.cache_entries, info.cache_bytes, info.cache_hits, info.cache_misses,
            info.turn_bytes,
        )

    def close(self) -> None:
        self.store.close()


def _with_turn_ids(exc: StoreUnavailableError, turns: Sequence[NewTurn]) -> StoreUnavailableError:
    """The error of an append whose outcome is unknown, with the turn ids to retry with (one
    per turn, in order, generated ones included), named in its message and in `turn_ids`."""
    ids = [t.turn_id for t in turns]
    shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    return StoreUnavailableError(
        f"{exc}; the turn ids to retry with (also in .turn_ids): {shown}", turn_ids=ids
    )


def _same_new(a: NewTurn, b: NewTurn) -> bool:
    """Whether two turns of one batch are the same turn (key order aside)."""
    return same_turn(Turn(0, a.turn_id, a.role, a.content, 0.0, a.message_json), b)


def _open_model(
    model: str | os.PathLike | Backend | Any | None, device: str | None, dtype: str | None
) -> Backend | None:
    """The backend for `OpticalMemory(model=...)`; a loaded DeepSeek-OCR model is wrapped."""
    if model is None:
        return None
    options = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if isinstance(model, (str, os.PathLike, Backend)):
        return open_backend(model, **options)
    from optical_memory.backends.deepseek_ocr.backend import DeepSeekOCRBackend

    return DeepSeekOCRBackend(model)


def _text_cost(record: PageRecord, text_tokens: int, counter: str) -> int:
    """Positions of a page's turns as text: measured when it was laid out, else estimated."""
    if record.text_cost and record.counter == counter:
        return record.text_cost
    return text_tokens + TURN_TEXT_OVERHEAD * (record.turns - len(record.skipped))


def _unpinned(
    turns: Sequence[Turn], pinned: Collection[int], text_start: tuple[int, int]
) -> list[Turn]:
    """The recent turns without the pinned ones (but a turn a page has begun stays whole)."""
    return [
        t for t in turns
        if t.index not in pinned or (t.index == text_start[0] and text_start[1] > 0)
    ]
