"""A plan: what the context of a session holds for a query, page by page, and what it costs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from optical_memory.modes import FADING_ORDER

TEXT = "text"  # a page shown as its text (it is then part of the recent text)


@dataclass(frozen=True)
class PagePlan:
    """One page in a plan: its place in the history and its mode now: a tier, "text" (its
    turns are part of the recent text), or None (out of the context).

    `precision` is the expected reading precision of the page as planned (`optical_memory.fox`:
    1.0 as text, 0.0 out); `score` the BM25 score of the query's best hit on the page (0.0:
    none); `raised` whether the query raised it (exempt from forgetting's order).
    """

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
    precision: float = 0.0
    score: float = 0.0
    raised: bool = False


@dataclass(frozen=True)
class Recalled:
    """A turn restored as exact text because the query needs it ("verbatim recall")."""

    turn: int
    page: int
    score: float
    tokens: int  # positions it takes in the context, its label included


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
    recalled: tuple[Recalled, ...] = ()  # turns restored verbatim for the query, in turn order
    planner: str = "readable"

    @property
    def labels(self) -> int:
        """Positions of the page labels in context."""
        return self.label_tokens * len(self.in_context())

    @property
    def vision_tokens(self) -> int:
        return sum(p.vision_tokens for p in self.pages)

    @property
    def recalled_tokens(self) -> int:
        return sum(r.tokens for r in self.recalled)

    @property
    def total(self) -> int:
        """Decoder positions the context takes, the answer reserve included."""
        return sum(self.positions().values())

    def positions(self) -> dict[str, int]:
        """The context's positions by kind; they add up to `total`."""
        return {
            "pinned": self.pinned_tokens,
            "vision": self.vision_tokens,
            "labels": self.labels,
            "recalled": self.recalled_tokens,
            "text": self.text_tokens,
            "query": self.query_tokens,
            "answer": self.answer_tokens,
            "prompt": self.overhead,
        }

    @property
    def history_tokens(self) -> int:
        """The whole history as plain text (pinned and recent text plus every other page's text)."""
        return self.pinned_tokens + self.text_tokens + sum(
            p.text_tokens for p in self.pages if p.mode != TEXT
        )

    @property
    def readable(self) -> float:
        """Expected readable fraction of the whole history: each page's text at its expected
        precision, pinned and recent text at 1.0 (turns recalled verbatim are not counted)."""
        read = self.pinned_tokens + self.text_tokens + sum(
            p.text_tokens * p.precision for p in self.pages if p.mode != TEXT
        )
        return read / self.history_tokens if self.history_tokens else 1.0

    def turn_precision(self, turn: int) -> float:
        """Expected precision at which the context holds turn `turn`: 1.0 as text (pinned,
        recent or recalled), its pages' lowest precision as an image, 0.0 out."""
        if turn in self.pinned or turn >= self.text_start[0] or any(
            r.turn == turn for r in self.recalled
        ):
            return 1.0
        on = [p.precision for p in self.pages if p.first_turn <= turn <= p.last_turn]
        return min(on) if on else 0.0

    @property
    def text_turns(self) -> int:
        """Turns in the recent text (pinned turns are counted apart)."""
        return self.turns - self.text_start[0] - sum(i >= self.text_start[0] for i in self.pinned)

    def in_context(self) -> list[PagePlan]:
        """The pages sent as images (pages shown as text are part of the recent text)."""
        return [p for p in self.pages if p.mode is not None and p.mode != TEXT]

    def raised(self) -> list[PagePlan]:
        """The pages the query raised, best score first."""
        return sorted((p for p in self.pages if p.raised), key=lambda p: (-p.score, p.index))

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
                "pages": sum(p.mode == TEXT for p in self.pages),
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
        extra += self.recalled_tokens
        lines.append(
            f"query {self.query_tokens:,} + answer reserve {self.answer_tokens:,} + "
            f"prompt {self.overhead:,}"
            + (f" + page labels {self.labels:,}" if self.labels else "")
            + (f" + recalled turns {self.recalled_tokens:,}" if self.recalled else "")
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
            f"{kept / max(1, self.history_tokens):.0%} of it in context, "
            f"{self.readable:.1%} readable by the Fox figures"
        )
        for p in self.raised():
            lines.append(
                f"raised by the query: page {p.index} (turns {p.first_turn + 1}-"
                f"{p.last_turn + 1}, score {p.score:.2f}) at {p.mode or 'out'}"
            )
        for r in self.recalled:
            lines.append(
                f"recalled verbatim: turn {r.turn + 1} (page {r.page}, score {r.score:.2f}, "
                f"{r.tokens} positions)"
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
            "readable": self.readable,
            "planner": self.planner,
            "recalled": [dict(vars(r)) for r in self.recalled],
            "tiers": self.rows(),
            "pages": [dict(vars(p)) for p in self.pages],
        }
