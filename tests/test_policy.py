import pytest

from optical_memory.modes import MODES
from optical_memory.policy import Policy, Schedule, solve

COSTS = {name: MODES[name].vision_tokens(1280, 1280) for name in MODES}  # gundam 693 ... tiny 73


def test_schedule_maps_age_to_fading_modes_then_out():
    s = Schedule(((10, "gundam"), (20, "base"), (30, "tiny")))
    assert [s.level(a) for a in (0, 9, 10, 25, 29.9, 30, 10_000)] == [0, 0, 2, 4, 4, 5, 5]


@pytest.mark.parametrize(
    "steps",
    [(), ((10, "tiny"), (20, "gundam")), ((20, "gundam"), (10, "tiny")), ((0, "gundam"),)],
)
def test_schedule_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="schedule"):
        Schedule(steps)


def test_schedule_rejects_unknown_mode_and_unit():
    with pytest.raises(ValueError, match="unknown mode"):
        Schedule(((10, "huge"),))
    with pytest.raises(ValueError, match="unit"):
        Schedule(unit="days")


def test_within_budget_the_schedule_decides():
    policy = Policy(schedule=Schedule(((2, "gundam"), (4, "large"), (6, "small"))), window=100_000)
    sol = solve([7, 5, 3, 1], [5000] * 4, COSTS, fixed_tokens=1000, policy=policy)
    assert sol.modes == [None, "small", "large", "gundam"]
    assert sol.vision_tokens == COSTS["small"] + COSTS["large"] + COSTS["gundam"]
    assert sol.fits


def test_over_budget_oldest_step_down_first_then_leave():
    policy = Policy(schedule=Schedule(((1000, "gundam"),)), window=3000)
    # four gundam pages (2772) + 1000 fixed: 772 over
    sol = solve([40, 30, 20, 10], [5000] * 4, COSTS, fixed_tokens=1000, policy=policy)
    # the oldest page goes gundam -> large (-272) -> base (-148) -> small (-162) -> tiny (-38):
    # still 152 over, so the second oldest steps gundam -> large (-272): fits
    assert sol.modes == ["tiny", "large", "gundam", "gundam"]
    assert sol.fits and 1000 + sol.vision_tokens <= 3000
    tight = solve([40, 30, 20, 10], [5000] * 4, COSTS, fixed_tokens=2800, policy=policy)
    assert tight.modes == [None, None, "tiny", "tiny"]  # all tiny is 292 > 200: the oldest leave
    assert 2800 + tight.vision_tokens <= 3000


def test_modes_never_sharper_for_older_pages_and_solution_is_deterministic():
    policy = Policy(window=8192)
    ages = list(range(3000, 0, -25))
    a = solve(ages, [5000] * len(ages), COSTS, fixed_tokens=2500, policy=policy)
    assert a == solve(ages, [5000] * len(ages), COSTS, fixed_tokens=2500, policy=policy)
    order = ["gundam", "large", "base", "small", "tiny", None]
    ranks = [order.index(m) for m in a.modes]
    assert ranks == sorted(ranks, reverse=True)
    assert a.fits and 2500 + a.vision_tokens <= 8192


def test_floor_keeps_pages_above_it_before_they_leave():
    policy = Policy(schedule=Schedule(((1000, "gundam"),)), window=1500, floor="base")
    sol = solve([20, 10], [5000] * 2, COSTS, fixed_tokens=1000, policy=policy)
    assert sol.modes == [None, "base"]


def test_fixed_part_alone_over_window_does_not_fit():
    sol = solve([5], [5000], COSTS, fixed_tokens=9000, policy=Policy())
    assert sol.modes == [None] and not sol.fits


def test_text_window_by_turns_and_tokens():
    p = Policy(recent_turns=3, recent_tokens=100)
    assert p.window_start([10] * 10) == 7
    assert p.window_start([10, 10, 90, 20]) == 3  # the 90-token turn does not fit beside 20
    assert p.window_start([500]) == 1  # a single turn over the budget leaves at once
    assert p.window_start([10] * 10, window=120) == 7  # a quarter of the window: 30 tokens
    assert p.window_start([10] * 10, window=80) == 8
    starts = [p.window_start([30, 5, 60, 10, 40, 3, 3][:n]) for n in range(8)]
    assert starts == sorted(starts)


def test_policy_rejects_negative_numbers():
    with pytest.raises(ValueError, match="window"):
        Policy(window=-1)


def test_no_page_costs_more_than_its_text():
    policy = Policy(schedule=Schedule(((1000, "gundam"),)), window=100_000)
    sol = solve([3, 2, 1], [2000, 500, 50], COSTS, fixed_tokens=0, policy=policy)
    assert sol.modes == ["gundam", "large", "tiny"]  # 693 <= 2000; 421 <= 500; tiny is the floor
    off = Policy(schedule=Schedule(((1000, "gundam"),)), window=100_000, min_compression=0)
    assert solve([1], [50], COSTS, 0, off).modes == ["gundam"]
