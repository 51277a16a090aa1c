"""OpticalMemory: the middleware a chatbot backend or an agent framework calls.

The turn log in the store is the source of truth. Everything else is derived
from it on demand: pages (sealed when full, see `pages`), the plan of the
context (see `policy`), page images and their vision tokens (see `cache`).
Only `context` and `ask` need a model; they import it lazily.
"""

from __future__ import annotations

import json
import os
import time
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from optical_memory.cache import IMAGE_MODE, VisionCache, cache_key
from optical_memory.messages import Message, MessageError, parse_message
from optical_memory.modes import FADING_ORDER, MODES
from optical_memory.pages import Pager, PageRecord
from optical_memory.policy import Policy, solve
from optical_memory.stores import CacheLimits, NewTurn, Store, Turn, open_store
from optical_memory.tokens import TokenCounter, default_counter
from renderers import RenderConfig, Renderer

if TYPE_CHECKING:
    import torch
    from PIL import Image

MAX_ID_CHARS = 256


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


def format_turns(turns: Iterable[Turn], first_offset: int = 0) -> str:
    """The recent turns as the decoder reads them: one "role: content" block per turn.

    `first_offset` skips the characters of the first turn already on a page.
    """
    lines = []
    for i, turn in enumerate(turns):
        content = turn.content[first_offset:] if i == 0 else turn.content
        lines.append(f"{turn.role}: {content}")
    return "\n".join(lines)


def format_query(query: str) -> str:
    return f"\nuser: {query}\nassistant:"


@dataclass(frozen=True)
class PagePlan:
    """One page in a plan: its place in the history and its mode now (None: out of the context)."""

    index: int
    first_turn: int
    last_turn: int
    sealed: bool
    text_tokens: int
    age: float
    mode: str | None
    vision_tokens: int
    content_hash: str


@dataclass(frozen=True)
class Plan:
    """What the context of a session holds for a query, and what each part costs."""

    session_id: str
    turns: int
    counter: str
    window: int
    age_unit: str
    pages: list[PagePlan]
    text_start: tuple[int, int]  # (turn, character) where the recent text begins
    text_tokens: int
    query_tokens: int
    answer_tokens: int
    overhead: int
    fits: bool
    page_costs: dict[str, int] = field(repr=False)

    @property
    def vision_tokens(self) -> int:
        return sum(p.vision_tokens for p in self.pages)

    @property
    def total(self) -> int:
        """Decoder positions the context takes, the answer reserve included."""
        return (
            self.vision_tokens + self.text_tokens + self.query_tokens + self.answer_tokens
            + self.overhead
        )

    @property
    def history_tokens(self) -> int:
        """The whole history as plain text (the recent text plus every page's text)."""
        return self.text_tokens + sum(p.text_tokens for p in self.pages)

    @property
    def text_turns(self) -> int:
        return self.turns - self.text_start[0]

    def in_context(self) -> list[PagePlan]:
        return [p for p in self.pages if p.mode is not None]

    def rows(self) -> list[dict[str, Any]]:
        """One row per tier (pages per mode, then out, then the recent text)."""
        rows = []
        for mode in (*FADING_ORDER, None):
            pages = [p for p in self.pages if p.mode == mode]
            text = sum(p.text_tokens for p in pages)
            vision = sum(p.vision_tokens for p in pages)
            rows.append(
                {
                    "tier": mode or "out",
                    "pages": len(pages),
                    "turns": len({t for p in pages for t in range(p.first_turn, p.last_turn + 1)}),
                    "text_tokens": text,
                    "context_tokens": vision,
                    "ratio": text / vision if vision else None,
                }
            )
        rows.append(
            {
                "tier": "text",
                "pages": 0,
                "turns": self.text_turns,
                "text_tokens": self.text_tokens,
                "context_tokens": self.text_tokens,
                "ratio": 1.0 if self.text_tokens else None,
            }
        )
        return rows

    def table(self) -> str:
        """The plan as a text table: tiers, then the totals against plain text."""
        head = (
            f"session {self.session_id!r}: {self.turns} turns, {len(self.pages)} pages, "
            f"{self.window}-position window, tokens by {self.counter}"
        )
        fmt = "{:<8} {:>6} {:>6} {:>12} {:>15} {:>7}"
        lines = [head, fmt.format("tier", "pages", "turns", "text tokens", "context tokens", "ratio")]
        for r in self.rows():
            ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "-"
            lines.append(
                fmt.format(
                    r["tier"], r["pages"], r["turns"], f"{r['text_tokens']:,}",
                    f"{r['context_tokens']:,}", ratio,
                )
            )
        kept = self.text_tokens + sum(p.text_tokens for p in self.in_context())
        used = self.text_tokens + self.vision_tokens
        extra = self.query_tokens + self.answer_tokens + self.overhead
        lines.append(
            f"query {self.query_tokens:,} + answer reserve {self.answer_tokens:,} + "
            f"prompt {self.overhead:,} = {extra:,} positions"
        )
        lines.append(
            f"context: {self.total:,} of {self.window:,} positions"
            + ("" if self.fits else "  ** over the window **")
            + f"; holds {kept:,} text tokens of history in {used:,} positions"
            + (f" ({kept / used:.1f}x)" if used else "")
        )
        windows = self.history_tokens / max(1, self.window - extra)
        lines.append(
            f"plain text: the whole history is {self.history_tokens:,} tokens "
            f"({windows:.1f} windows); optical memory keeps "
            f"{kept / max(1, self.history_tokens):.0%} of it in context"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "turns": self.turns,
            "counter": self.counter,
            "window": self.window,
            "age_unit": self.age_unit,
            "text_start": list(self.text_start),
            "text_tokens": self.text_tokens,
            "query_tokens": self.query_tokens,
            "answer_tokens": self.answer_tokens,
            "overhead": self.overhead,
            "vision_tokens": self.vision_tokens,
            "total": self.total,
            "fits": self.fits,
            "history_tokens": self.history_tokens,
            "tiers": self.rows(),
            "pages": [vars(p) for p in self.pages],
        }


@dataclass(frozen=True)
class Context:
    """Decoder inputs for a plan: `segments` (page embeddings, oldest first, then text)."""

    plan: Plan
    segments: list[Any]
    encoded: int  # pages encoded for this call (the rest came from the cache)


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
    """Chat memory whose old turns become vision tokens that fade with age.

    `store`: None for the embedded SQLite file, a path, `sqlite:///path`,
    `redis://host:port/db`, or a Store. `model`: a checkpoint directory (loaded
    on first use by `context`/`ask`) or a loaded model. `render`: the page
    geometry (default: `RenderConfig.memory_page()`, the 1280x1280 Gundam canvas;
    lower modes are derived from it by the encoder's preprocessing).
    `max_content_chars` bounds one turn.
    """

    def __init__(
        self,
        store: str | os.PathLike | Store | None = None,
        *,
        model: str | os.PathLike | Any | None = None,
        device: str | None = None,
        dtype: str | None = None,
        render: RenderConfig | None = None,
        policy: Policy | None = None,
        cache: CacheLimits | None = None,
        max_content_chars: int = 200_000,
    ):
        self.store = open_store(store, cache=cache)
        self.policy = policy or Policy()
        self.max_content_chars = max_content_chars
        self._model_source = model if isinstance(model, (str, os.PathLike)) else None
        self._model = None if self._model_source is not None else model
        self._device, self._dtype = device, dtype
        self._render_config = render or RenderConfig.memory_page()
        self._pager: Pager | None = None
        self._recounted: dict[tuple[str, str], int] = {}  # (page hash, counter) -> text tokens
        self.cache = VisionCache(self.store)

    # --- lazily built parts ---------------------------------------------------------
    @property
    def model(self) -> Any:
        """The model, loaded on first use; ValueError when none was given."""
        if self._model is None:
            if self._model_source is None:
                raise ValueError("this OpticalMemory has no model: pass model=<checkpoint dir>")
            from optical_memory.backends.deepseek_ocr import load_model

            self._model = load_model(self._model_source, device=self._device, dtype=self._dtype)
        return self._model

    @property
    def counter(self) -> TokenCounter:
        """The decoder's tokenizer once a model is loaded, else the tiktoken estimate."""
        return self._model.token_counter if self._model is not None else default_counter()

    @property
    def window(self) -> int:
        return self._model.window if self._model is not None else self.policy.window

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
        msg = parse_message(message, where)
        if len(msg.content) > self.max_content_chars:
            raise MessageError(
                f"{where}: content has {len(msg.content):,} characters, over the limit of "
                f"{self.max_content_chars:,} (max_content_chars)"
            )
        tid = uuid.uuid4().hex if turn_id is None else check_id(turn_id, f"{where}: turn id")
        return NewTurn(tid, msg.role, msg.content)

    def append(self, session_id: str, role: str, content: str, turn_id: str | None = None) -> Turn:
        """Store one turn durably before returning; a retry with the same turn id stores nothing twice."""
        check_id(session_id, "session id")
        new = self._new_turn({"role": role, "content": content}, turn_id, "turn")
        return self.store.append(session_id, [new])[0]

    def extend(
        self,
        session_id: str,
        messages: Iterable[Message | Mapping[str, Any]],
        turn_ids: Sequence[str] | None = None,
    ) -> list[Turn]:
        """Append a history in one atomic batch; every message is checked before anything is stored.

        A message may carry its own "turn_id"; `turn_ids` gives them all at once.
        """
        check_id(session_id, "session id")
        messages = list(messages)
        if turn_ids is not None and len(turn_ids) != len(messages):
            raise ValueError(f"{len(turn_ids)} turn ids for {len(messages)} messages")
        new = []
        for i, m in enumerate(messages):
            tid = turn_ids[i] if turn_ids is not None else (
                m.get("turn_id") if isinstance(m, Mapping) else None
            )
            new.append(self._new_turn(m, tid, f"message {i}"))
        return self.store.append(session_id, new) if new else []

    def _require(self, session_id: str) -> int:
        check_id(session_id, "session id")
        count = self.store.turn_count(session_id)
        if count == 0:
            raise UnknownSessionError(f"unknown session {session_id!r}: it holds no turns")
        return count

    def turns(self, session_id: str) -> list[Turn]:
        self._require(session_id)
        return self.store.turns(session_id)

    def sessions(self) -> list[str]:
        return self.store.sessions()

    def delete(self, session_id: str) -> bool:
        """Remove a session, its pages and its cache entries; False if it did not exist."""
        check_id(session_id, "session id")
        if self._pager is not None:
            self._pager.forget(session_id)
        return self.store.delete(session_id)

    def export_jsonl(self, session_id: str, path: str | os.PathLike) -> int:
        """Write the session as JSONL (role, content, turn_id); returns the number of turns."""
        turns = self.turns(session_id)
        with Path(path).open("w", encoding="utf-8") as f:
            f.writelines(
                json.dumps({"role": t.role, "content": t.content, "turn_id": t.turn_id},
                           ensure_ascii=False) + "\n"
                for t in turns
            )
        return len(turns)

    def import_jsonl(self, session_id: str, path: str | os.PathLike) -> list[Turn]:
        """Append the turns of a JSONL file (as written by export_jsonl) in one batch.

        Lines with a "turn_id" are idempotent: importing the same file twice stores them once.
        """
        messages = []
        with Path(path).open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise MessageError(f"{path}: line {number}: not JSON: {exc.msg}") from None
                    parse_message(obj, f"{path}: line {number}")
                    messages.append(obj)
        return self.extend(session_id, messages)

    # --- pages and plans ------------------------------------------------------------
    def _window_start(self, session_id: str, count: int) -> tuple[int, list[Turn]]:
        recent = self.store.turns(session_id, max(0, count - self.policy.recent_turns), count)
        tokens = [self.counter.count(f"{t.role}: {t.content}") for t in recent]
        return count - len(recent) + self.policy.window_start(tokens, self.window), recent

    def pages(self, session_id: str, progress: bool = False) -> list[PageRecord]:
        """Seal the pages that are due; all pages of the session, the open one last.

        With `progress`, sealing goes in steps of 50 turns under a progress bar (the
        pages are the same: a full page does not depend on the turns after it).
        """
        count = self._require(session_id)
        start, _ = self._window_start(session_id, count)
        done = min(start, self.store.info(session_id).cursor) if progress else start
        with tqdm(total=start - done, desc="paging", unit="turn", disable=start - done < 100) as bar:
            for stop in range(done + 50, start, 50):
                self.pager.sync(session_id, stop)
                bar.update(50)
            sealed, open_page = self.pager.sync(session_id, start)
            bar.update(bar.total - bar.n)
        return sealed + ([open_page] if open_page else [])

    def plan(self, session_id: str, query: str | None = None, budget: int | None = None) -> Plan:
        """What the context holds for `query` now: pages and their modes, text, every token count.

        Needs no model. `budget` overrides the decoder window.
        """
        count = self._require(session_id)
        start, recent = self._window_start(session_id, count)
        sealed, open_page = self.pager.sync(session_id, start)
        records = sealed + ([open_page] if open_page else [])
        text_start = max(records[-1].end if records else (0, 0), (start, 0))
        text_turns = recent[text_start[0] - (count - len(recent)) :]
        text_tokens = self.counter.count(format_turns(text_turns, text_start[1])) if text_turns else 0
        query_tokens = self.counter.count(format_query(query)) if query else 0
        window = budget if budget is not None else self.window
        canvas = self.render_config
        costs = {m: MODES[m].vision_tokens(canvas.width, canvas.height) for m in FADING_ORDER}
        schedule = self.policy.schedule
        if schedule.unit == "turns":
            ages = [count - 1 - r.last_turn for r in records]
        else:
            now = time.time()
            ages = [max(0.0, now - r.newest_time) for r in records]
        fixed = text_tokens + query_tokens + self.policy.answer_tokens + self.policy.overhead
        policy = replace(self.policy, window=window)
        page_tokens = self._page_tokens(session_id, records)
        solution = solve(ages, page_tokens, costs, fixed, policy)
        pages = [
            PagePlan(
                r.index, r.first_turn, r.last_turn, r.sealed, tokens, age, mode,
                costs[mode] if mode else 0, r.content_hash,
            )
            for r, tokens, age, mode in zip(records, page_tokens, ages, solution.modes)
        ]
        return Plan(
            session_id=session_id,
            turns=count,
            counter=self.counter.name,
            window=window,
            age_unit=schedule.unit,
            pages=pages,
            text_start=text_start,
            text_tokens=text_tokens,
            query_tokens=query_tokens,
            answer_tokens=self.policy.answer_tokens,
            overhead=self.policy.overhead,
            fits=solution.fits,
            page_costs=costs,
        )

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

    # --- page images and vision tokens ---------------------------------------------
    def page_image(self, session_id: str, page: PageRecord | PagePlan) -> Image.Image:
        """The page rendered at the configured canvas, from the cache or rendered (and cached) now."""
        record = self._record(session_id, page)
        key = cache_key(record.content_hash, record.fingerprint, IMAGE_MODE, "")
        image = self.cache.get_image(session_id, key)
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

    def encode_pages(
        self, session_id: str, plan: Plan, progress: bool = False, batch_size: int = 8
    ) -> tuple[list[torch.Tensor], int]:
        """Vision tokens of the plan's pages in context, oldest first; encodes only cache misses.

        Misses are encoded in batches of up to `batch_size` pages of one mode.
        """
        encoder = self.model.encoder
        records = {r.index: r for r in self.pages(session_id)}
        wanted = plan.in_context()
        out: dict[int, torch.Tensor] = {}
        misses: dict[str, list[tuple[PagePlan, str]]] = {}
        for p in wanted:
            record = records.get(p.index)
            if record is None or record.content_hash != p.content_hash:
                raise LookupError(
                    f"page {p.index} of session {session_id!r} changed since the plan; plan again"
                )
            key = cache_key(p.content_hash, record.fingerprint, p.mode, encoder.fingerprint)
            hit = self.cache.get_tensor(session_id, key)
            if hit is not None:
                out[p.index] = hit
            else:
                misses.setdefault(p.mode, []).append((p, key))
        encoded = sum(len(group) for group in misses.values())
        self.store.count_cache(session_id, hits=len(out), misses=encoded)
        with tqdm(total=encoded, desc="encoding pages", unit="page", disable=not progress) as bar:
            for mode, group in misses.items():
                for start in range(0, len(group), batch_size):
                    chunk = group[start : start + batch_size]
                    images = [self.page_image(session_id, records[p.index]) for p, _ in chunk]
                    for (p, key), embedding in zip(chunk, encoder.encode_batch(images, mode)):
                        self.cache.put_tensor(session_id, key, embedding)
                        out[p.index] = embedding
                    bar.update(len(chunk))
        return [out[p.index] for p in wanted], encoded

    def context(
        self, session_id: str, query: str, budget: int | None = None, progress: bool = False
    ) -> Context:
        """The decoder inputs for `query`: page embeddings (cached or encoded now), recent text, query."""
        _ = self.model  # loaded first, so that the plan counts with the decoder's tokenizer
        plan = self.plan(session_id, query, budget)
        if not plan.fits:
            raise ValueError(
                f"session {session_id!r}: recent text ({plan.text_tokens}), query "
                f"({plan.query_tokens}) and answer reserve ({plan.answer_tokens}) exceed the "
                f"{plan.window}-position window even with every page out of the context"
            )
        embeddings, encoded = self.encode_pages(session_id, plan, progress)
        recent = self.store.turns(session_id, plan.text_start[0], plan.turns)
        text = format_turns(recent, plan.text_start[1])
        segments: list[Any] = [*embeddings, "\n" + text + format_query(query)]
        return Context(plan, segments, encoded)

    def ask(
        self,
        session_id: str,
        query: str,
        max_new_tokens: int | None = None,
        turn_id: str | None = None,
        progress: bool = False,
        **generation: Any,
    ) -> str:
        """Answer `query` from the session's memory, then append the question and the answer as turns."""
        question = self._new_turn({"role": "user", "content": query}, turn_id, "query")
        answer_tokens = max_new_tokens or self.policy.answer_tokens
        _ = self.model
        # a longer answer than the policy reserves takes its extra positions from the pages
        budget = self.window - max(0, answer_tokens - self.policy.answer_tokens)
        ctx = self.context(session_id, query, budget=budget, progress=progress)
        answer = self.model.generate(ctx.segments, max_new_tokens=answer_tokens, **generation)
        reply = self._new_turn({"role": "assistant", "content": answer}, None, "answer")
        self.store.append(session_id, [question, reply])
        return answer

    def stats(self, session_id: str) -> Stats:
        """Turns, pages per mode now, cache use of a session."""
        plan = self.plan(session_id)
        info = self.store.info(session_id)
        by_mode = {m: 0 for m in (*FADING_ORDER, "out")}
        for p in plan.pages:
            by_mode[p.mode or "out"] += 1
        return Stats(
            session_id, info.turns, sum(p.sealed for p in plan.pages), by_mode,
            info.cache_entries, info.cache_bytes, info.cache_hits, info.cache_misses,
            info.turn_bytes,
        )

    def close(self) -> None:
        self.store.close()

