"""The "readable" planner: which option each page gets, which pages the query raises, which
turns come back verbatim. Pure arithmetic on what the store holds (`OpticalMemory.plan`
gathers it), so it is deterministic and needs no model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from optical_memory.backends.profiles import Tier
from optical_memory.fox import TEXT_PRECISION, page_precision
from optical_memory.modes import FADING_ORDER
from optical_memory.plan import TEXT
from optical_memory.policy import Policy
from optical_memory.search import Hit
from optical_memory.solver import solve_readable

OPTIONS: tuple[str | None, ...] = (TEXT, *FADING_ORDER, None)
# positions a turn takes as text beyond its content ("role: ", newline), for pages whose
# cost as text was not measured
TURN_TEXT_OVERHEAD = 3
RECALL_LABEL_TOKENS = 16  # positions reserved for a recalled turn's label


@dataclass(frozen=True)
class PageFacts:
    """What the planner knows of a page: its turns, text size and age."""

    first_turn: int
    last_turn: int
    text_tokens: int
    text_cost: int  # positions as text ("role: content" lines)
    age: float


@dataclass(frozen=True)
class Candidate:
    """A query hit that may be restored verbatim: the turn, its score, its cost as text."""

    hit: Hit
    tokens: int


@dataclass(frozen=True)
class Choice:
    """The planner's answer: per page its mode, precision, score and whether it was raised;
    the recalled hits."""

    modes: list[str | None]
    precisions: list[float]
    scores: list[float]
    raised: list[bool]
    recalled: list[Candidate]


def page_scores(pages: Sequence[PageFacts], hits: Sequence[Hit]) -> list[float]:
    """Per page, the best score of a hit on it (0.0 for none)."""
    scores = [0.0] * len(pages)
    for hit in hits:
        for i, page in enumerate(pages):
            if page.first_turn <= hit.turn <= page.last_turn:
                scores[i] = max(scores[i], hit.score)
    return scores


def _text_run(picked: Sequence[int]) -> int:
    """The first page shown as text (option 0), or the number of pages."""
    return next((i for i, o in enumerate(picked) if o == 0), len(picked))


def choose(
    policy: Policy,
    pages: Sequence[PageFacts],
    tiers: Mapping[str, Tier],
    label_tokens: int,
    budget: int,
    hits: Sequence[Hit] = (),
    candidates: Sequence[Candidate] = (),
) -> Choice:
    """Spend `budget` positions on the pages (oldest first) and the verbatim `candidates`.

    `hits` are the query's retained hits on these pages (best first); a page holding one is
    raised: weighted up by its score and left out of forgetting's order. Recalled candidates
    take their positions first, within `policy.verbatim_tokens`.
    """
    n = len(pages)
    scores = page_scores(pages, hits)
    best = max(scores, default=0.0)
    recalled: list[Candidate] = []
    spent = 0
    for c in candidates:  # at most a quarter of the budget, so pages keep room
        if spent + c.tokens <= min(policy.verbatim_tokens, budget // 4):
            recalled.append(c)
            spent += c.tokens
    budget -= spent

    text = np.array([p.text_tokens for p in pages], dtype=np.float64)
    precision = np.zeros((n, len(OPTIONS)))  # the last option, out, reads at 0 and costs 0
    costs = np.zeros((n, len(OPTIONS)))
    precision[:, 0] = TEXT_PRECISION
    costs[:, 0] = [p.text_cost for p in pages]
    grid = np.array([tiers[m].tokens for m in FADING_ORDER], dtype=np.float64)
    precision[:, 1:-1] = page_precision(text[:, None], grid[None, :])
    costs[:, 1:-1] = [tiers[m].cost + label_tokens for m in FADING_ORDER]
    weight = np.array([
        policy.age_weight(p.age) * (1.0 + policy.relevance_boost * s / best if best else 1.0)
        for p, s in zip(pages, scores)
    ])
    values = weight[:, None] * text[:, None] * precision

    # First every page in forgetting's order; pages with hits older than the text run that
    # gives are then raised: out of the order, restored verbatim rather than shown as text.
    # A raised page that falls inside the text run joins it (its turns are text there).
    every = np.ones(n, dtype=bool)
    picked = solve_readable(values, costs, budget, every, policy.monotone) if n else []
    raised = {i for i, s in enumerate(scores) if s > 0 and i < _text_run(picked)}
    while raised:  # shrinks every round
        offered = values.copy()
        offered[sorted(raised), 0] = -np.inf
        chained = np.array([i not in raised for i in range(n)], dtype=bool)
        trial = solve_readable(offered, costs, budget, chained, policy.monotone)
        inside = {i for i in raised if i > _text_run(trial)}
        if not inside:
            picked = trial
            break
        raised -= inside
    modes = [OPTIONS[o] for o in picked]
    in_text = {i for i, m in enumerate(modes) if m == TEXT}
    recalled = [
        c for c in recalled
        if not any(pages[i].first_turn <= c.hit.turn <= pages[i].last_turn for i in in_text)
    ]
    return Choice(
        modes,
        [float(precision[i, o]) for i, o in enumerate(picked)],
        scores,
        [i in raised for i in range(n)],
        recalled,
    )
