"""The forgetting policy: what stays text, how pages fade, and the budget they must fit.

Two planners spend the window. "readable" (the default, `optical_memory.solver`)
gives each page the option (its text, a tier, or out) that keeps the most
expected readable text of the history, weighted by a forgetting curve and by the
query. "schedule" is the fixed age schedule below.

The older a page, the fewer vision tokens it may cost: a schedule maps age
(in turns since the page's newest turn, or in seconds) to a mode, from gundam
down to tiny, then out of the context (the turns stay in the store). The solver
then makes the whole context fit the decoder window: over budget, the oldest
pages step down first (one mode at a time, the oldest page all the way to the
floor before the next), then the oldest leave the context. Everything here is
plain arithmetic on numbers the store already holds, so planning needs no model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from optical_memory.modes import FADING_ORDER, get_mode

AGE_UNITS = ("turns", "seconds")
PLANNERS = ("readable", "schedule")


@dataclass(frozen=True)
class Schedule:
    """Age thresholds: a page younger than `steps[k][0]` is encoded at `steps[k][1]`.

    Steps are in ascending age and their modes fade in FADING_ORDER; a page older
    than the last threshold leaves the context.
    """

    steps: tuple[tuple[float, str], ...] = (
        (150, "gundam"),
        (300, "large"),
        (500, "base"),
        (800, "small"),
        (1500, "tiny"),
    )
    unit: str = "turns"

    def __post_init__(self) -> None:
        if self.unit not in AGE_UNITS:
            raise ValueError(f"schedule unit must be one of {AGE_UNITS}, got {self.unit!r}")
        if not self.steps:
            raise ValueError("a schedule needs at least one (age, mode) step")
        ages = [age for age, _ in self.steps]
        if any(a <= 0 for a in ages) or ages != sorted(set(ages)):
            raise ValueError(f"schedule ages must be positive and strictly ascending, got {ages}")
        ranks = [FADING_ORDER.index(get_mode(mode).name) for _, mode in self.steps]
        if ranks != sorted(ranks):
            raise ValueError(
                f"schedule modes must fade in the order {', '.join(FADING_ORDER)}, "
                f"got {[m for _, m in self.steps]}"
            )

    def level(self, age: float) -> int:
        """Index into FADING_ORDER for a page of this age; len(FADING_ORDER) means out."""
        for limit, mode in self.steps:
            if age < limit:
                return FADING_ORDER.index(mode)
        return OUT


OUT = len(FADING_ORDER)


@dataclass(frozen=True)
class Policy:
    """What stays text, how pages fade, and the decoder budget they must fit.

    Planner "readable": a page's text tokens count toward the value of an option at its
    expected precision (`optical_memory.fox`), weighted by 0.5 ** (age / `half_life`)
    (age in `half_life_unit`: "turns" or "seconds"; None: no forgetting). With `monotone`
    a newer page is never blurrier than an older one, unless the query raised the older
    one: a query's best `recall_hits` turns by BM25 (those scoring at least `min_score`
    of the best) raise their pages, whose weight grows by up to `relevance_boost` times,
    and up to `verbatim_tokens` positions (at most a quarter of what pages may spend)
    restore those turns as exact text where their page is not text already (0: no
    verbatim recall).

    Text window: the last `recent_turns` turns are not paged, fewer if they hold more
    than `recent_tokens` tokens or a quarter of the decoder window (the readable planner
    may show older pages as text too). The context must fit `window` positions with
    `answer_tokens` reserved for the answer and `overhead` for the prompt's special tokens.

    Planner "schedule": pages fade by the fixed `schedule`; over budget, pages step down no
    lower than `floor` before the oldest leave. A page is never given a mode that costs
    more than its text tokens divided by `min_compression` (above the floor; 0 turns this
    off): a sharper mode than that spends more positions than the plain text would.
    """

    schedule: Schedule = field(default_factory=Schedule)
    recent_turns: int = 12
    recent_tokens: int = 1500
    window: int = 8192
    answer_tokens: int = 512
    overhead: int = 8
    floor: str = "tiny"
    min_compression: float = 1.0
    planner: str = "readable"
    half_life: float | None = 2000.0
    half_life_unit: str = "turns"
    monotone: bool = True
    recall_hits: int = 8
    min_score: float = 0.3
    relevance_boost: float = 8.0
    verbatim_tokens: int = 1024

    def __post_init__(self) -> None:
        for name in (
            "recent_turns", "recent_tokens", "window", "answer_tokens", "overhead",
            "min_compression", "recall_hits", "min_score", "relevance_boost", "verbatim_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"policy {name} must not be negative, got {getattr(self, name)}")
        get_mode(self.floor)
        if self.planner not in PLANNERS:
            raise ValueError(f"policy planner must be one of {PLANNERS}, got {self.planner!r}")
        if self.half_life_unit not in AGE_UNITS:
            raise ValueError(
                f"policy half_life_unit must be one of {AGE_UNITS}, got {self.half_life_unit!r}"
            )
        if self.half_life is not None and not self.half_life > 0:
            raise ValueError(f"policy half_life must be positive or None, got {self.half_life}")

    @property
    def age_unit(self) -> str:
        """The unit plan ages are in: the schedule's, or the forgetting curve's."""
        return self.schedule.unit if self.planner == "schedule" else self.half_life_unit

    def age_weight(self, age: float) -> float:
        """The forgetting curve: how much a page of this age counts (1 now, 1/2 a half-life ago)."""
        return 1.0 if self.half_life is None else 0.5 ** (age / self.half_life)

    @property
    def floor_level(self) -> int:
        return FADING_ORDER.index(self.floor)

    def window_start(self, tokens: Sequence[int], window: int | None = None) -> int:
        """Index of the oldest turn of the text window, given the token count of every turn.

        The text window holds at most a quarter of the decoder `window` (default:
        the policy's). Non-decreasing as turns are appended, so paging never moves back.
        """
        limit = min(self.recent_tokens, (window or self.window) // 4)
        start = len(tokens)
        used = 0
        while start > 0 and len(tokens) - start < self.recent_turns:
            if used + tokens[start - 1] > limit:
                break
            used += tokens[start - 1]
            start -= 1
        return start


@dataclass(frozen=True)
class Solution:
    """Modes chosen for pages (None: out of the context) and the tokens they cost."""

    modes: list[str | None]
    vision_tokens: int
    fits: bool


def solve(
    ages: Sequence[float],
    text_tokens: Sequence[int],
    costs: Mapping[str, int],
    fixed_tokens: int,
    policy: Policy,
) -> Solution:
    """Choose a mode for each page, oldest page first in `ages`.

    `text_tokens` are the pages' text sizes; `costs` gives the vision tokens of
    one page per mode; `fixed_tokens` is everything else the context holds (text,
    query, answer reserve, overhead). Deterministic: the same inputs always give
    the same modes.
    """
    cost = [costs[m] for m in FADING_ORDER] + [0]
    floor = policy.floor_level
    level = [policy.schedule.level(a) for a in ages]
    if policy.min_compression > 0:
        for i, text in enumerate(text_tokens):
            while level[i] < floor and cost[level[i]] * policy.min_compression > text:
                level[i] += 1
    deficit = fixed_tokens + sum(cost[lv] for lv in level) - policy.window
    i = 0
    while deficit > 0 and i < len(level):  # step the oldest pages down, to the floor
        while level[i] < floor and deficit > 0:
            deficit -= cost[level[i]] - cost[level[i] + 1]
            level[i] += 1
        i += 1
    i = 0
    while deficit > 0 and i < len(level):  # then the oldest leave
        if level[i] != OUT:
            deficit -= cost[level[i]]
            level[i] = OUT
        i += 1
    modes = [FADING_ORDER[lv] if lv != OUT else None for lv in level]
    return Solution(modes, sum(cost[lv] for lv in level), deficit <= 0)
