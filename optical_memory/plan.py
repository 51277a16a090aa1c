"""A plan: what the context of a session holds for a query, page by page, and what it costs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from optical_memory.modes import FADING_ORDER


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
    vision_tokens: int  # positions of its image at its tier (0 when out), as the backend counts
    content_hash: str
    newest_time: float  # creation time of its newest turn (for labels such as "3 days ago")


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
    page_costs: dict[str, int] = field(repr=False)  # tier -> positions of one page's image
    label_tokens: int = 0  # positions reserved for each page's text label in context
    pinned: tuple[int, ...] = ()  # turns kept as text first (system, developer, pinned)
    pinned_tokens: int = 0

    @property
    def labels(self) -> int:
        """Positions of the page labels in context."""
        return self.label_tokens * len(self.in_context())

    @property
    def vision_tokens(self) -> int:
        return sum(p.vision_tokens for p in self.pages)

    @property
    def total(self) -> int:
        """Decoder positions the context takes, the answer reserve included."""
        return (
            self.pinned_tokens + self.vision_tokens + self.labels + self.text_tokens
            + self.query_tokens + self.answer_tokens + self.overhead
        )

    def positions(self) -> dict[str, int]:
        """The context's positions by kind; they add up to `total`."""
        return {
            "pinned": self.pinned_tokens,
            "vision": self.vision_tokens,
            "labels": self.labels,
            "text": self.text_tokens,
            "query": self.query_tokens,
            "answer": self.answer_tokens,
            "prompt": self.overhead,
        }

    @property
    def history_tokens(self) -> int:
        """The whole history as plain text (pinned and recent text plus every page's text)."""
        return self.pinned_tokens + self.text_tokens + sum(p.text_tokens for p in self.pages)

    @property
    def text_turns(self) -> int:
        """Turns in the recent text (pinned turns are counted apart)."""
        return self.turns - self.text_start[0] - sum(i >= self.text_start[0] for i in self.pinned)

    def in_context(self) -> list[PagePlan]:
        return [p for p in self.pages if p.mode is not None]

    def rows(self) -> list[dict[str, Any]]:
        """One row per tier: the pinned text, pages per mode, then out, then the recent text."""
        rows = [
            {
                "tier": "pinned",
                "pages": 0,
                "turns": len(self.pinned),
                "text_tokens": self.pinned_tokens,
                "context_tokens": self.pinned_tokens,
                "ratio": 1.0 if self.pinned_tokens else None,
            }
        ]
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
        columns = ("tier", "pages", "turns", "text tokens", "context tokens", "ratio")
        lines = [head, fmt.format(*columns)]
        for r in self.rows():
            ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "-"
            lines.append(
                fmt.format(
                    r["tier"], r["pages"], r["turns"], f"{r['text_tokens']:,}",
                    f"{r['context_tokens']:,}", ratio,
                )
            )
        text = self.pinned_tokens + self.text_tokens
        kept = text + sum(p.text_tokens for p in self.in_context())
        used = text + self.vision_tokens
        extra = self.query_tokens + self.answer_tokens + self.overhead + self.labels
        lines.append(
            f"query {self.query_tokens:,} + answer reserve {self.answer_tokens:,} + "
            f"prompt {self.overhead:,}"
            + (f" + page labels {self.labels:,}" if self.labels else "")
            + f" = {extra:,} positions"
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

    def to_json(self, indent: int | None = 1) -> str:
        """The plan as JSON text (the fields of `to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-serialisable dict: totals, the tier rows and every page."""
        return {
            "session_id": self.session_id,
            "turns": self.turns,
            "counter": self.counter,
            "window": self.window,
            "age_unit": self.age_unit,
            "text_start": list(self.text_start),
            "text_tokens": self.text_tokens,
            "pinned": list(self.pinned),
            "pinned_tokens": self.pinned_tokens,
            "query_tokens": self.query_tokens,
            "answer_tokens": self.answer_tokens,
            "overhead": self.overhead,
            "label_tokens": self.label_tokens,
            "vision_tokens": self.vision_tokens,
            "total": self.total,
            "fits": self.fits,
            "history_tokens": self.history_tokens,
            "tiers": self.rows(),
            "pages": [dict(vars(p)) for p in self.pages],
        }
