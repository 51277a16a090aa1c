"""Pinned turns: system and developer turns (and turns pinned by the caller) stay text, first."""

from __future__ import annotations

import pytest

from optical_memory.conversation import build_conversation
from optical_memory.memory import OpticalMemory, PinnedOverflowError, UnknownSessionError
from optical_memory.policy import Policy

SYSTEM = build_conversation(1)[0]


def page_texts(mem: OpticalMemory, session: str) -> list[str]:
    turns = mem.store.turns(session)
    return ["".join(mem.pager.text_of(r, turns[r.first_turn :])) for r in mem.pages(session)]


@pytest.fixture
def mem(store):
    return OpticalMemory(store, profile="qwen2.5-vl")


def test_the_system_prompt_stays_first_and_text_in_every_plan(mem):
    history = build_conversation(600)
    assert history[0] == SYSTEM
    for start, stop in ((0, 50), (50, 200), (200, 400), (400, 600)):
        mem.extend("s", history[start:stop])
        plan = mem.plan("s", "When do we launch?")
        assert plan.pinned == (0,)
        assert plan.pinned_tokens > 0 and plan.rows()[0]["tier"] == "pinned"
        assert all(r.first_turn > 0 or 0 in r.skipped for r in mem.pages("s"))
        assert not any(SYSTEM["content"] in text for text in page_texts(mem, "s"))
        messages = mem.messages("s", "When do we launch?")
        assert messages[0] == {"role": "system", "content": SYSTEM["content"]}
        assert sum(m["role"] == "system" for m in messages) == 1
        prompt = mem.prompt("s", "When do we launch?")
        assert prompt.pinned_text() == f"system: {SYSTEM['content']}"
        assert all(role != "system" for role, _ in prompt.recent)
        assert plan.total == plan.pinned_tokens + plan.vision_tokens + plan.labels + (
            plan.recalled_tokens + plan.text_tokens + plan.query_tokens + plan.answer_tokens + plan.overhead
        )


def test_a_developer_turn_is_left_out_of_its_page(mem):
    history = build_conversation(200)
    developer = {"role": "developer", "content": "Answer in one sentence. DEVELOPER-RULE-7"}
    mem.extend("s", [*history[:40], developer, *history[40:]])
    records = mem.pages("s")
    holder = next(r for r in records if r.first_turn < 40 < r.last_turn)
    assert 40 in holder.skipped
    assert not any("DEVELOPER-RULE-7" in text for text in page_texts(mem, "s"))
    mem.page_image("s", holder)  # re-rendered without the pinned turn: same layout as sealed
    plan = mem.plan("s")
    assert plan.pinned == (0, 40)
    pinned = mem.prompt("s").pinned
    assert pinned == [("system", SYSTEM["content"]), ("developer", developer["content"])]


def test_pin_and_unpin_any_turn(mem):
    mem.extend("s", build_conversation(120), turn_ids=[f"t{i}" for i in range(120)])
    recent_id = "t118"
    before = mem.prompt("s", "q")
    assert ("user", mem.turns("s")[118].content) not in before.pinned
    mem.pin("s", recent_id)
    after = mem.prompt("s", "q")
    assert after.plan.pinned == (0, 118)
    assert after.pinned[-1] == (mem.turns("s")[118].role, mem.turns("s")[118].content)
    assert all(c != mem.turns("s")[118].content for _, c in after.recent)
    mem.unpin("s", recent_id)
    assert mem.plan("s", "q").pinned == (0,)
    assert mem.pinned("s") == [0]
    with pytest.raises(LookupError, match="no turn with id 'nope'"):
        mem.pin("s", "nope")
    with pytest.raises(UnknownSessionError):
        mem.pin("other", "t1")


def test_pinning_a_paged_turn_changes_no_sealed_page(mem):
    mem.extend("s", build_conversation(300), turn_ids=[f"t{i}" for i in range(300)])
    sealed = [r for r in mem.pages("s") if r.sealed]
    mem.pin("s", "t10")
    assert [r for r in mem.pages("s") if r.sealed][: len(sealed)] == sealed
    assert mem.plan("s").pinned == (0, 10)
    mem.page_image("s", sealed[0])  # still lays out as sealed: no PageDriftError


def test_a_pinned_turn_not_yet_paged_stays_off_later_pages(mem):
    history = build_conversation(400)
    history[95] = {"role": "user", "content": "PINNED-MARKER-95: remember the red door."}
    mem.extend("s", history[:100], turn_ids=[f"t{i}" for i in range(100)])
    mem.pin("s", "t95")
    mem.extend("s", history[100:], turn_ids=[f"t{i}" for i in range(100, 400)])
    holder = next(r for r in mem.pages("s") if r.first_turn <= 95 <= r.last_turn)
    assert 95 in holder.skipped
    assert not any("PINNED-MARKER-95" in t for t in page_texts(mem, "s"))
    assert mem.prompt("s").pinned[-1] == ("user", history[95]["content"])
    mem.page_image("s", holder)


def test_pinned_turns_over_the_window_are_a_clear_error(store):
    mem = OpticalMemory(store, policy=Policy(window=600, answer_tokens=64))
    mem.extend(
        "s", [{"role": "system", "content": "rule " * 800}, {"role": "user", "content": "hi"}]
    )
    with pytest.raises(
        PinnedOverflowError, match=r"1 pinned turns alone take \d+ positions, over the 600-position window"
    ):
        mem.plan("s", "q")
    assert mem.plan("s", "q", budget=2000).fits
