"""The readable planner: the solver's properties, retrieval on both stores, verbatim recall."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from optical_memory import OpticalMemory
from optical_memory.conversation import build_conversation
from optical_memory.fox import FOX_FIGURES, expected_precision, page_precision
from optical_memory.modes import FADING_ORDER
from optical_memory.plan import TEXT
from optical_memory.policy import Policy
from optical_memory.solver import solve_readable

RANK = {TEXT: 0, **{m: i + 1 for i, m in enumerate(FADING_ORDER)}, None: len(FADING_ORDER) + 1}
FACT = "The storage unit code is 4417, next to the blue door on Harbour Street."


def test_fox_figures_are_met_and_precision_falls_with_compression():
    for ratio, precision in FOX_FIGURES:
        assert expected_precision(ratio) == pytest.approx(precision)
    ratios = np.linspace(0, 40, 401)
    values = [expected_precision(r) for r in ratios]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[0] == 0.985 and values[-1] == 0.0
    assert page_precision(640, 64) == pytest.approx(0.973 + (0.965 - 0.973) * 2.5 / 3)  # 10x
    assert page_precision(100, 0) == 0.0
    with pytest.raises(ValueError, match="compression ratio"):
        expected_precision(float("nan"))


def _instance(rng, n):
    tokens = rng.integers(20, 900, n)
    costs = np.stack([tokens * 1.05, *[np.full(n, c) for c in (693, 421, 273, 111, 73)],
                      np.zeros(n)], axis=1)
    grid = np.array([656, 400, 256, 100, 64])
    precision = np.column_stack([np.ones(n)]
                                + [[page_precision(t, g) for t in tokens] for g in grid]
                                + [np.zeros(n)])
    weight = 0.5 ** (np.arange(n)[::-1] / rng.uniform(2, 20))
    return weight[:, None] * tokens[:, None] * precision, costs


def _best(values, costs, budget, chained):
    n, options = values.shape
    best = -1.0
    for choice in itertools.product(range(options), repeat=n):
        if sum(costs[i, c] for i, c in enumerate(choice)) > budget:
            continue
        ranks = [c for i, c in enumerate(choice) if chained[i]]
        if any(a < b for a, b in itertools.pairwise(ranks)):
            continue
        best = max(best, sum(values[i, c] for i, c in enumerate(choice)))
    return best


def test_the_solver_fits_keeps_the_order_and_is_near_the_optimum():
    rng = np.random.default_rng(7)
    gaps = []
    for _ in range(60):
        n = int(rng.integers(1, 5))
        values, costs = _instance(rng, n)
        budget = float(rng.integers(0, 2500))
        chained = np.ones(n, dtype=bool)
        choice = solve_readable(values, costs, budget, chained)
        assert choice == solve_readable(values, costs, budget, chained)  # deterministic
        assert sum(costs[i, c] for i, c in enumerate(choice)) <= budget
        assert all(a >= b for a, b in itertools.pairwise(choice)), "older pages never sharper"
        got = sum(values[i, c] for i, c in enumerate(choice))
        best = _best(values, costs, budget, chained)
        assert got <= best + 1e-9
        gaps.append((best - got) / best if best > 0 else 0.0)
    assert np.mean(gaps) < 0.01 and np.median(gaps) == 0.0


def test_an_unchained_page_may_be_sharper_than_newer_ones():
    values = np.array([[0, 50.0, 0], [0, 1.0, 0]])  # options: text (absent), tier, out
    values[:, 0] = -np.inf
    costs = np.array([[0, 10.0, 0], [0, 10.0, 0]])
    assert solve_readable(values, costs, 10, np.array([False, True])) == [1, 2]
    assert solve_readable(values, costs, 20, np.array([True, True])) == [1, 1]


@pytest.fixture
def mem(store):
    return OpticalMemory(store)


def test_a_history_that_fits_stays_text(mem):
    mem.extend("s", build_conversation(80))
    plan = mem.plan("s", "When do we launch?")
    assert plan.pages and all(p.mode == TEXT and p.precision == 1.0 for p in plan.pages)
    assert plan.vision_tokens == 0 and plan.readable == 1.0
    assert plan.text_start == (plan.pages[0].first_turn, 0)  # after the pinned system prompt
    assert plan.total <= plan.window
    prompt = mem.prompt("s", "When do we launch?")
    assert not prompt.pages
    assert len(prompt.recent) == 80 - len(plan.pinned)


def test_plans_fit_fade_in_order_and_keep_pinned_turns_text(mem):
    history = build_conversation(700)
    mem.extend("s", history)
    pinned = mem.plan("s").pinned
    assert pinned, "the conversation opens with a system prompt"
    for budget in (1500, 3000, 6000, 8192, 20000):
        plan = mem.plan("s", budget=budget)
        assert plan.fits and plan.total <= budget
        assert plan == mem.plan("s", budget=budget)
        ranks = [RANK[p.mode] for p in plan.pages]  # oldest first: never sharper with age
        assert all(a >= b for a, b in itertools.pairwise(ranks)), ranks
        assert all(plan.turn_precision(t) == 1.0 for t in pinned)
        for p in plan.pages:
            if p.mode in FADING_ORDER:
                tier = mem.tiers[p.mode]
                assert p.precision == pytest.approx(page_precision(p.text_tokens, tier.tokens))
    tight, loose = mem.plan("s", budget=3000), mem.plan("s", budget=20000)
    assert tight.readable < loose.readable <= 1.0
    assert loose.text_start[0] < tight.text_start[0], "a larger budget shows more text"


def test_wall_clock_forgetting(store):
    mem = OpticalMemory(store, policy=Policy(half_life=3600, half_life_unit="seconds"))
    mem.extend("s", build_conversation(400))
    plan = mem.plan("s")
    assert plan.age_unit == "seconds" and all(0 <= p.age < 60 for p in plan.pages)
    assert plan.fits


def test_search_ranks_the_planted_turn_first_on_both_stores(mem):
    history = build_conversation(300)
    history[120] = {"role": "user", "content": FACT}
    mem.extend("s", history)
    hits = mem.search("s", "what was the code of the storage unit?")
    assert hits[0].turn == 120 and hits[0].score > 0
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    assert mem.search("s", "the of and") == []
    mem.append("s", "user", "I changed the storage unit code to 9920 today.")
    assert {h.turn for h in mem.search("s", "storage unit code")[:2]} == {120, 300}
    mem.delete("s")
    mem.append("s", "user", "A new life for this session id.")
    assert mem.search("s", "storage unit code") == []


def test_a_sessions_scores_do_not_depend_on_other_sessions(store):
    one, other = OpticalMemory(store), OpticalMemory(store)
    one.extend("a", [{"role": "user", "content": FACT}, {"role": "user", "content": "budget"}])
    before = one.search("a", "storage code budget")
    other.extend("b", [{"role": "user", "content": f"budget storage {i}"} for i in range(50)])
    assert one.search("a", "storage code budget") == before


def test_the_query_raises_its_page_and_restores_the_turn_verbatim(mem):
    history = build_conversation(700)
    history[150] = {"role": "user", "content": FACT}
    mem.extend("s", history)
    query = "Where is the storage unit and what is its code?"
    without = mem.plan("s", budget=4000)
    plan = mem.plan("s", query, budget=4000)
    assert plan.fits and plan.total <= 4000
    page = next(p for p in plan.pages if p.first_turn <= 150 <= p.last_turn)
    assert page.raised and page.score > 0
    assert [r.turn for r in plan.recalled][:1] == [150] or 150 in [r.turn for r in plan.recalled]
    assert plan.turn_precision(150) == 1.0 > without.turn_precision(150)
    table = plan.table()
    assert f"raised by the query: page {page.index} " in table
    assert "recalled verbatim: turn 151 " in table and "readable by the Fox figures" in table
    assert plan.to_dict()["recalled"][0].keys() == {"turn", "page", "score", "tokens"}
    prompt = mem.prompt("s", query, budget=4000)
    stored = mem.turns("s")[150]
    assert ("user", stored.content) in [(role, text) for _, role, text in prompt.recalled]
    assert stored.content == FACT
    messages = mem.messages("s", query, budget=4000)
    texts = [part["text"] for m in messages if isinstance(m["content"], list)
             for part in m["content"] if part["type"] == "text"]
    assert any(FACT in t for t in texts), "the exact stored text is in the context"
    off = OpticalMemory(mem.store, policy=Policy(verbatim_tokens=0, recall_hits=0))
    assert off.plan("s", query, budget=4000).recalled == ()


