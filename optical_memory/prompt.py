"""The planned context as a model reads it: pinned text, labelled pages, recent turns, the query.

Two formats come out of one `Prompt`: OpenAI chat messages (`messages()`, for
any chat model that takes `image_url` parts) and the plain text the DeepSeek-OCR
decoder reads after its page embeddings (`recent_text()` + `format_query`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from optical_memory.backends.profiles import Tier
from optical_memory.cache import VisionCache
from optical_memory.messages import chat_messages
from optical_memory.pages import PageRecord
from optical_memory.plan import PagePlan, Plan
from optical_memory.stores import Store

PAGES_INTRO = "Earlier in this conversation (pages of the transcript, oldest first):"
RECALLED_INTRO = "Exact text of earlier turns on those pages:"


def format_turns(turns: Iterable[Any], first_offset: int = 0) -> str:
    """Turns as the DeepSeek-OCR decoder reads them: one "role: content" block per turn.

    `first_offset` skips the characters of the first turn already on a page.
    """
    lines = []
    for i, turn in enumerate(turns):
        content = turn.content[first_offset:] if i == 0 else turn.content
        lines.append(f"{turn.role}: {content}")
    return "\n".join(lines)


def format_query(query: str) -> str:
    return f"\nuser: {query}\nassistant:"


def age_text(seconds: float) -> str:
    """'just now', '5 minutes ago', '3 hours ago', '2 days ago'."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        n = int(seconds // size)
        if n >= 1:
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def page_label(page: PagePlan, now: float | None = None) -> str:
    """What a page holds and when, e.g. "turns 120-151, 3 days ago" (turns numbered from 1)."""
    first, last = page.first_turn + 1, page.last_turn + 1
    turns = f"turn {first}" if first == last else f"turns {first}-{last}"
    age = age_text(max(0.0, (time.time() if now is None else now) - page.newest_time))
    return f"{turns}, {age}"


class PageSource(Protocol):
    """Where a prompt's pages come from (an `OpticalMemory`): records, images, the cache."""

    store: Store
    cache: VisionCache

    def pages(self, session_id: str) -> list[PageRecord]: ...

    def page_image(self, session_id: str, page: PageRecord) -> Image.Image: ...

    def page_pngs(
        self, session_id: str, pages: Sequence[tuple[PageRecord, Tier]]
    ) -> list[str]: ...


def recalled_label(turn: int, created: float, now: float | None = None) -> str:
    """'turn 878, 3 days ago' (turns numbered from 1)."""
    age = age_text(max(0.0, (time.time() if now is None else now) - created))
    return f"turn {turn + 1}, {age}"


@dataclass(frozen=True)
class PromptPage:
    """A page in context: its plan entry and stored record, the tier it is sent at, its label."""

    page: PagePlan
    record: PageRecord
    tier: Tier
    label: str


@dataclass(frozen=True)
class Prompt:
    """A session's context for one query, ready for a backend.

    `pinned` holds the pinned turns (system, developer, and those pinned by the caller)
    as (role, content) pairs, in turn order; `recent` holds the text window as (role, content) pairs, the first one cut
    where the last page ends. Page images and cached vision tokens come from
    `memory` on demand, so a backend reads only what it needs.
    """

    session_id: str
    plan: Plan
    pages: list[PromptPage]
    recent: list[tuple[str, str]]
    query: str | None
    memory: PageSource = field(repr=False)
    pinned: list[tuple[str, str]] = field(default_factory=list)
    # the same turns as the messages they were given as (tool calls, tool call ids, parts
    # intact); a turn a page has begun is {"role", "content": the rest of its render text}
    recent_messages: list[dict[str, Any]] = field(default_factory=list)
    pinned_messages: list[dict[str, Any]] = field(default_factory=list)
    # turns restored verbatim for the query: (label, role, content), in turn order
    recalled: list[tuple[str, str, str]] = field(default_factory=list)

    def recent_text(self) -> str:
        return "\n".join(f"{role}: {content}" for role, content in self.recent)

    def recalled_text(self) -> str:
        """The recalled turns as one block of text ("" when there are none)."""
        if not self.recalled:
            return ""
        lines = [f"({label}) {role}: {content}" for label, role, content in self.recalled]
        return "\n".join([RECALLED_INTRO, *lines])

    def pinned_text(self) -> str:
        return "\n".join(f"{role}: {content}" for role, content in self.pinned)

    def page_pngs(self) -> list[str]:
        """The pages as base64 PNGs at their tiers' geometry (cached per page and tier)."""
        return self.memory.page_pngs(self.session_id, [(p.record, p.tier) for p in self.pages])

    def messages(self, include_query: bool = True) -> list[dict[str, Any]]:
        """OpenAI chat messages: the pinned turns, one user message of labelled page images
        (PNG data URLs at each page's tier geometry, oldest first) and of the turns recalled
        verbatim for the query, the recent turns as they were given (see `messages.chat_messages` for what a chat API cannot take), the query
        (unless `include_query` is false: planned for, left for the caller to send)."""
        out = chat_messages(self.pinned_messages)
        parts: list[dict[str, Any]] = []
        if self.pages:
            parts.append({"type": "text", "text": PAGES_INTRO})
            for page, png in zip(self.pages, self.page_pngs()):
                image: dict[str, str] = {"url": "data:image/png;base64," + png}
                if page.tier.detail:
                    image["detail"] = page.tier.detail
                parts.append({"type": "text", "text": page.label})
                parts.append({"type": "image_url", "image_url": image})
        if self.recalled:
            parts.append({"type": "text", "text": self.recalled_text()})
        if parts:
            out.append({"role": "user", "content": parts})
        out.extend(chat_messages(self.recent_messages))
        if self.query and include_query:
            out.append({"role": "user", "content": self.query})
        return out
