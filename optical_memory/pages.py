"""Pages of a session: turns that left the text window, grouped into immutable page records.

Pagination continues from the end of the last sealed page over the turns older
than the text window. A page is sealed (stored) only when full, that is closed
because its next line did not fit: greedy layout then guarantees that later
turns cannot change it, so no sealed boundary ever moves and cached renders and
embeddings stay valid. The trailing page that still has room is the session's
open page: it is in the context like the others but rebuilt as turns arrive.

Sealing is a compare-and-set on the store's page count, so concurrent writers
agree: both compute the same pages, one stores them, the other reads them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from optical_memory.stores.base import Store, Turn
from optical_memory.tokens import TokenCounter
from renderers import Page, Renderer


class PageDriftError(RuntimeError):
    """A sealed page no longer lays out the same: the render configuration changed."""


@dataclass(frozen=True)
class PageRecord:
    """A page as stored: which characters of which turns it holds, and what it costs.

    `start` and `end` are (turn, character) positions; `end` is where the next
    page begins. `counter` names the tokenizer of `text_tokens`. `newest_time` is the creation time of the page's newest turn,
    for wall-clock ages.
    """

    index: int
    start: tuple[int, int]
    end: tuple[int, int]
    first_turn: int
    last_turn: int
    content_hash: str
    fingerprint: str
    width: int
    height: int
    text_tokens: int  # of the page's text, by the renderer's counter
    counter: str
    newest_time: float
    sealed: bool = True
    skipped: tuple[int, ...] = ()  # pinned turns inside first..last that the page leaves out
    text_cost: int = 0  # positions of its turns as text ("role: content" lines); 0: not known

    @property
    def turns(self) -> int:
        return self.last_turn - self.first_turn + 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PageRecord:
        data = dict(data)
        data["start"], data["end"] = tuple(data["start"]), tuple(data["end"])
        data["skipped"] = tuple(data.get("skipped", ()))
        return cls(**data)


def _record(
    page: Page, index: int, laid_out: Sequence[Turn], next_turn: int, counter: TokenCounter
) -> PageRecord:
    """A record for `page`, laid out from `laid_out` (the turns given to the renderer, pinned
    ones left out); `next_turn` is the turn after them."""
    lines = [
        f"{laid_out[s.turn].role}: {laid_out[s.turn].content[s.start : s.end]}" for s in page.spans
    ]
    first, last = laid_out[page.first_turn].index, laid_out[page.last_turn].index
    start = (first, page.spans[0].start)
    n, char = page.next_start
    end = (laid_out[n].index, char) if n < len(laid_out) else (next_turn, 0)
    held = {t.index for t in laid_out[page.first_turn : page.last_turn + 1]}
    return PageRecord(
        index=index,
        start=start,
        end=end,
        first_turn=first,
        last_turn=last,
        content_hash=page.content_hash,
        fingerprint=page.fingerprint,
        width=page.width,
        height=page.height,
        text_tokens=page.text_tokens,
        counter=counter.name,
        newest_time=laid_out[page.last_turn].created,
        sealed=page.full,
        skipped=tuple(i for i in range(first, last + 1) if i not in held),
        text_cost=counter.count("\n".join(lines)) + 1,  # and the newline before the next
    )


class Pager:
    """Pages the sessions of one store with one renderer."""

    def __init__(self, store: Store, renderer: Renderer):
        self.store = store
        self.renderer = renderer
        # Per session: ((generation, pages end, window start, pinned), open page). Pure
        # layout, recomputable; a new generation (the session deleted and created again) misses.
        self._open: dict[str, tuple[tuple[Any, ...], PageRecord | None]] = {}

    def sealed(self, session_id: str) -> list[PageRecord]:
        records = [PageRecord.from_json(r) for r in self.store.pages(session_id)]
        if records and records[-1].fingerprint != self.renderer.fingerprint:
            raise PageDriftError(
                f"session {session_id!r} was paged with render configuration "
                f"{records[-1].fingerprint[:12]}, this memory renders with "
                f"{self.renderer.fingerprint[:12]}: use the same configuration for this session"
            )
        return records

    def sync(
        self, session_id: str, window_start: int, pinned: Collection[int] = ()
    ) -> tuple[list[PageRecord], PageRecord | None]:
        """Seal every full page older than `window_start`; return the sealed pages and the open one.

        `pinned` turns stay out of new pages (sealed pages never change; a turn a page has
        begun is finished on the next one).
        """
        pins = frozenset(pinned)
        while True:
            generation = self.store.generation(session_id)
            records = self.sealed(session_id)
            end = records[-1].end if records else (0, 0)
            if end[0] >= window_start:
                return records, None
            key = (generation, end, window_start, pins)
            memo = self._open.get(session_id)
            if memo is not None and memo[0] == key:
                return records, memo[1]
            older = [
                t for t in self.store.turns(session_id, end[0], window_start)
                if t.index not in pins or (t.index == end[0] and end[1] > 0)
            ]
            laid = self.renderer.paginate([t.to_message() for t in older], start=(0, end[1]))
            fresh = [
                _record(page, len(records) + i, older, window_start, self.renderer.counter)
                for i, page in enumerate(laid)
            ]
            full = [r for r in fresh if r.sealed]
            open_page = next((r for r in fresh if not r.sealed), None)
            if not full:
                self._open[session_id] = (key, open_page)
                return records, open_page
            pages = [r.to_json() for r in full]
            if self.store.add_pages(session_id, len(records), pages, window_start, generation):
                self._open[session_id] = ((generation, full[-1].end, window_start, pins), open_page)
                return records + full, open_page
            # another writer sealed pages first, or the session was deleted (and perhaps
            # created again) meanwhile: read what is there now and continue from there

    def text_of(self, record: PageRecord, turns: Sequence[Turn]) -> list[str]:
        """The contents the page holds (as the renderer counts them), given turns from its first on."""
        texts = []
        for turn in turns[: record.turns]:
            if turn.index in record.skipped:
                continue
            begin = record.start[1] if turn.index == record.first_turn else 0
            stop = record.end[1] if turn.index == record.end[0] else len(turn.content)
            texts.append(turn.content[begin:stop])
        return texts

    def forget(self, session_id: str) -> None:
        """Drop what this pager remembers of a session (after the session is deleted)."""
        self._open.pop(session_id, None)

    def image(self, session_id: str, record: PageRecord) -> Image.Image:
        """Render a page again from its turns; the layout must match the record."""
        turns = [
            t for t in self.store.turns(session_id, record.first_turn, record.last_turn + 1)
            if t.index not in record.skipped
        ]
        laid = self.renderer.paginate([t.to_message() for t in turns], start=(0, record.start[1]))
        if not laid or laid[0].content_hash != record.content_hash:
            raise PageDriftError(
                f"page {record.index} of session {session_id!r} no longer lays out the same "
                "(render configuration or fonts changed)"
            )
        return self.renderer.render(laid[0])

