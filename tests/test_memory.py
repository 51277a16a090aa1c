"""OpticalMemory without a model: the turn log, pages, plans and stats, on both stores."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from optical_memory.memory import OpticalMemory, UnknownSessionError
from optical_memory.messages import MessageError
from optical_memory.policy import Policy, Schedule
from optical_memory.prompt import page_label


@pytest.fixture
def mem(store) -> OpticalMemory:
    return OpticalMemory(store, policy=Policy(recent_turns=6, recent_tokens=600))


def test_append_is_stored_and_idempotent_with_turn_id(mem):
    a = mem.append("chat-42", "user", "Our launch date is March 3rd.")
    b = mem.append("chat-42", "assistant", "Noted: March 3rd.", turn_id="msg-2")
    again = mem.append("chat-42", "assistant", "Noted: March 3rd.", turn_id="msg-2")
    assert (a.index, b.index) == (0, 1) and again == b
    assert [t.content for t in mem.turns("chat-42")] == [
        "Our launch date is March 3rd.",
        "Noted: March 3rd.",
    ]
    assert mem.sessions() == ["chat-42"]


def test_extend_export_import_round_trip(mem, tmp_path, conversation):
    msgs = conversation(30)
    mem.extend("a", msgs, turn_ids=[f"m{i}" for i in range(30)])
    path = tmp_path / "a.jsonl"
    assert mem.export_jsonl("a", path) == 30
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"role": "user", "content": msgs[0]["content"], "turn_id": "m0"}
    mem.import_jsonl("b", path)
    mem.import_jsonl("b", path)  # turn ids make a second import a no-op
    assert [t.to_message() for t in mem.turns("b")] == msgs
    assert mem.delete("a") and mem.sessions() == ["b"]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m.append("s", "robot", "hi"), MessageError, "unknown role"),
        (lambda m: m.append("s", "user", 42), MessageError, "must be a string"),
        (lambda m: m.append("s", "user", "x" * 1001), MessageError, "over the limit"),
        (lambda m: m.append("", "user", "hi"), ValueError, "1 to 256"),
        (lambda m: m.append("s" * 257, "user", "hi"), ValueError, "1 to 256"),
        (lambda m: m.append("a\x00b", "user", "hi"), ValueError, "control character"),
        (lambda m: m.append(None, "user", "hi"), TypeError, "session id must be a string"),
        (lambda m: m.append("s", "user", "hi", turn_id=""), ValueError, "turn id"),
        (
            lambda m: m.extend(
                "s", [{"role": "user", "content": "ok"}, {"role": "x", "content": "no"}]
            ),
            MessageError,
            "message 1",
        ),
        (lambda m: m.plan("nobody"), UnknownSessionError, "unknown session 'nobody'"),
        (lambda m: m.stats("nobody"), UnknownSessionError, "unknown session"),
    ],
)
def test_bad_input_is_refused_and_stores_nothing(store, call, error, message):
    mem = OpticalMemory(store, max_content_chars=1000)
    with pytest.raises(error, match=message):
        call(mem)
    assert mem.sessions() == []


def test_sealed_pages_never_move_and_cover_the_history(mem, conversation):
    msgs = conversation(160)
    mem.extend("s", msgs[:100])
    before = mem.pages("s")
    sealed = [p for p in before if p.sealed]
    assert len(sealed) >= 3 and not before[-1].sealed
    mem.extend("s", msgs[100:])
    after = mem.pages("s")
    assert after[: len(sealed)] == sealed
    # consecutive: each page starts where the previous one ended, from the first turn on
    assert after[0].start == (0, 0)
    for prev, nxt in itertools.pairwise(after):
        assert nxt.start == prev.end
    assert all(p.sealed for p in after[:-1])
    # everything older than the text window is on a page; pages shown as text move the
    # start of the recent text back to the first of them
    plan = mem.plan("s")
    text_pages = [p for p in plan.pages if p.mode == "text"]
    start = after[text_pages[0].index].start if text_pages else after[-1].end
    assert plan.text_start == start
    tight = mem.plan("s", budget=2000)
    assert tight.text_start[0] > plan.text_start[0]


def test_two_memories_on_one_store_agree_on_pages(store_factory, conversation):
    policy = Policy(recent_turns=4, recent_tokens=400)
    a = OpticalMemory(store_factory(), policy=policy)
    b = OpticalMemory(store_factory(), policy=policy)
    a.extend("s", conversation(80))
    pa = a.pages("s")
    pb = b.pages("s")
    assert pa == pb
    assert len(a.store.pages("s")) == len([p for p in pa if p.sealed])


def test_plan_fits_the_window_and_counts_every_part(mem, conversation):
    mem.extend("s", conversation(300))
    plan = mem.plan("s", query="When do we launch?")
    assert plan.fits and plan.total <= 8192
    assert plan.counter.startswith("tiktoken/cl100k_base")
    assert plan.query_tokens > 0 and plan.answer_tokens == 512
    assert plan.total == (
        plan.vision_tokens
        + plan.recalled_tokens
        + plan.text_tokens
        + plan.query_tokens
        + plan.answer_tokens
        + plan.overhead
    )
    tiers = {r["tier"]: r for r in plan.rows()}
    assert sum(r["pages"] for r in tiers.values()) == len(plan.pages)
    assert plan.history_tokens == sum(r["text_tokens"] for r in tiers.values())
    assert plan.vision_tokens > 0, "300 turns do not fit 8192 positions as text"
    table = plan.table()
    assert "text" in table and "plain text" in table and "tiktoken" in table
    # a smaller budget keeps fewer tokens, and plans are deterministic
    small = mem.plan("s", query="When do we launch?", budget=3000)
    assert small.total <= 3000 < plan.total
    assert small == mem.plan("s", query="When do we launch?", budget=3000)


def test_older_pages_fade_by_schedule(store, conversation):
    policy = Policy(
        schedule=Schedule(((40, "gundam"), (80, "base"), (120, "tiny"))),
        recent_turns=4,
        recent_tokens=400,
        window=100_000,
        min_compression=0,
        planner="schedule",
    )
    mem = OpticalMemory(store, policy=policy)
    mem.extend("s", conversation(200))
    plan = mem.plan("s")
    for p in plan.pages:
        expected = (
            "gundam" if p.age < 40 else "base" if p.age < 80 else "tiny" if p.age < 120 else None
        )
        assert p.mode == expected
    assert {p.mode for p in plan.pages} == {"gundam", "base", "tiny", None}


def test_wall_clock_schedule_uses_turn_times(store, conversation):
    policy = Policy(
        schedule=Schedule(((3600, "gundam"),), unit="seconds"), recent_turns=4, planner="schedule"
    )
    mem = OpticalMemory(store, policy=policy)
    mem.extend("s", conversation(60))
    plan = mem.plan("s")
    assert plan.age_unit == "seconds"
    assert all(0 <= p.age < 60 and p.mode is not None for p in plan.pages)


def test_page_images_are_rendered_once_then_cached(mem, conversation):
    mem.extend("s", conversation(60))
    sealed = next(p for p in mem.pages("s") if p.sealed)
    image = mem.page_image("s", sealed)
    assert image.size == (1280, 1280)
    info = mem.store.info("s")
    assert info.cache_entries == 1
    assert mem.page_image("s", sealed).tobytes() == image.tobytes()


def test_stats_report_pages_and_cache(mem, conversation):
    mem.extend("s", conversation(120))
    stats = mem.stats("s")
    assert stats.turns == 120
    assert stats.pages_sealed == len(mem.store.pages("s"))
    assert sum(stats.pages_by_mode.values()) == len(mem.pages("s"))
    assert "turns" in stats.table()


def test_page_text_recount_matches_the_renderer(mem, conversation):
    from optical_memory.tokens import default_counter

    mem.extend("s", conversation(80))
    turns = mem.store.turns("s")
    records = mem.pages("s")
    assert any(r.start[1] > 0 for r in records)  # some page begins inside a turn
    for r in records:
        texts = mem.pager.text_of(r, turns[r.first_turn :])
        assert sum(default_counter().count(t) for t in texts) == r.text_tokens
        assert r.counter == default_counter().name


def test_with_closes_the_store(tmp_path):
    from optical_memory.stores import StoreError

    with OpticalMemory(tmp_path / "m.sqlite3") as mem:
        mem.append("s", "user", "hi")
    with pytest.raises(StoreError, match="closed"):
        mem.turns("s")
    with OpticalMemory(tmp_path / "m.sqlite3") as again:  # the file itself is intact
        assert [t.content for t in again.turns("s")] == ["hi"]


def test_a_messages_created_at_is_the_turns_time(store, conversation):
    """Imported logs keep their times: "created_at" (Unix seconds or ISO 8601) dates the turn,
    so page labels and wall-clock forgetting follow the conversation, not the import."""
    day = 86400.0
    start = time.time() - 40 * day
    history = [
        {**m, "created_at": start + i * day / 10} for i, m in enumerate(conversation(300))
    ]
    history[1]["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start))
    mem = OpticalMemory(store, policy=Policy(half_life=10 * day, half_life_unit="seconds"))
    mem.extend("s", history)
    turns = mem.turns("s")
    assert turns[0].created == history[0]["created_at"]
    assert abs(turns[1].created - start) < 1 and turns[-1].created == history[-1]["created_at"]
    assert turns[1].to_message()["created_at"] == history[1]["created_at"]  # kept as given
    plan = mem.plan("s")
    oldest = plan.pages[0]
    assert oldest.age > 30 * day and oldest.newest_time == turns[oldest.last_turn].created
    assert "days ago" in page_label(oldest)
    count = len(turns)
    for bad, why in (("yesterday", "not an ISO 8601"), (True, "Unix seconds or an ISO 8601"),
                     (time.time() + 30 * day, "between 1970 and tomorrow"), (-5, "between 1970")):
        with pytest.raises(MessageError, match=f"message 1: 'created_at' .*{why}"):
            mem.extend("s", [{"role": "user", "content": "ok"},
                             {"role": "user", "content": "late", "created_at": bad}])
    assert len(mem.turns("s")) == count  # nothing of a refused batch stored
