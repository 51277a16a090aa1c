"""One suite for every store: the embedded SQLite file and Redis (the real server)."""

from __future__ import annotations

import time

import pytest

from optical_memory.stores import CacheLimits, NewTurn, TurnConflictError

STORE_ON_CLUSTER = True  # the store fixtures run on a Redis Cluster too (conftest)


def turns(*pairs: tuple[str, str], prefix: str = "t") -> list[NewTurn]:
    return [NewTurn(f"{prefix}{i}", role, content) for i, (role, content) in enumerate(pairs)]


def test_append_assigns_gap_free_indices_in_order(store):
    stored = store.append("s", turns(("user", "hi"), ("assistant", "hello"), ("user", "bye")))
    assert [t.index for t in stored] == [0, 1, 2]
    more = store.append("s", [NewTurn("x", "user", "again")])
    assert more[0].index == 3
    assert [t.content for t in store.turns("s")] == ["hi", "hello", "bye", "again"]
    assert [t.index for t in store.turns("s", 1, 3)] == [1, 2]
    assert store.turn_count("s") == 4
    assert store.turn_count("other") == 0


def test_retry_with_same_turn_id_stores_nothing_twice(store):
    first = store.append("s", [NewTurn("m1", "user", "Our launch date is March 3rd.")])
    again = store.append("s", [NewTurn("m1", "user", "Our launch date is March 3rd.")])
    assert again == first
    assert store.turn_count("s") == 1
    # a batch repeating an id inside itself, and mixing old and new turns
    out = store.append(
        "s", [NewTurn("m2", "user", "a"), NewTurn("m2", "user", "a"), *first_as_new(first)]
    )
    assert [t.index for t in out] == [1, 1, 0]
    assert store.turn_count("s") == 2


def first_as_new(stored):
    return [NewTurn(t.turn_id, t.role, t.content) for t in stored]


def test_reused_turn_id_with_other_content_is_refused_and_writes_nothing(store):
    store.append("s", [NewTurn("m1", "user", "one")])
    with pytest.raises(TurnConflictError, match="m1"):
        store.append("s", [NewTurn("m2", "user", "two"), NewTurn("m1", "user", "changed")])
    assert [t.turn_id for t in store.turns("s")] == ["m1"]


def test_sessions_are_isolated_even_with_key_like_ids(store):
    ids = ["a", "a:turns", "{a}", "a}:x{", "*", "ü/😀"]
    for sid in ids:
        store.append(sid, [NewTurn("1", "user", f"content of {sid}")])
    assert store.sessions() == sorted(ids)
    for sid in ids:
        assert [t.content for t in store.turns(sid)] == [f"content of {sid}"]


def test_delete_removes_session_and_derived_data(store):
    store.append("s", turns(("user", "hi")))
    store.append("keep", turns(("user", "stay")))
    assert store.add_pages("s", 0, [{"index": 0}], cursor=1, generation=store.generation("s"))
    store.cache_put("s", "k", b"value")
    assert store.delete("s") is True
    assert store.delete("s") is False
    assert store.sessions() == ["keep"]
    assert store.turns("s") == [] and store.pages("s") == []
    assert store.cache_get("s", "k") is None
    assert store.info("s").cache_bytes == 0


def test_pages_are_appended_with_compare_and_set(store):
    store.append("s", turns(("user", "hi")))
    gen = store.generation("s")
    assert gen and store.generation("s") == gen
    assert store.add_pages("s", 0, [{"index": 0, "h": "a"}, {"index": 1, "h": "b"}], 7, gen)
    assert not store.add_pages("s", 0, [{"index": 0, "h": "other"}], 9, gen)
    assert store.add_pages("s", 2, [], 12, gen)
    assert [p["h"] for p in store.pages("s")] == ["a", "b"]
    assert store.info("s").cursor == 12


def test_a_new_life_of_a_session_refuses_pages_of_the_old(store):
    assert store.generation("s") == ""  # no session, no generation
    store.append("s", turns(("user", "old")))
    old = store.generation("s")
    store.delete("s")
    assert store.generation("s") == ""
    assert not store.add_pages("s", 0, [{"index": 0}], 1, old)  # deleted: nothing written
    store.append("s", turns(("user", "new")))
    new = store.generation("s")
    assert new and new != old
    assert not store.add_pages("s", 0, [{"index": 0}], 1, old)
    assert store.pages("s") == []
    assert store.add_pages("s", 0, [{"index": 0}], 1, new)


def test_cache_round_trip_and_counters(store):
    assert store.cache_get("s", "k") is None
    payload = bytes(range(256)) * 10
    store.cache_put("s", "k", payload)
    assert store.cache_get("s", "k") == payload
    store.cache_delete("s", "k")
    assert store.cache_get("s", "k") is None
    store.count_cache("s", hits=3, misses=2)  # no session: nothing to count, no orphan row
    assert (store.info("s").cache_hits, store.info("s").cache_misses) == (0, 0)
    store.append("s", turns(("user", "hi")))
    store.count_cache("s", hits=3, misses=2)
    store.count_cache("s", hits=1)
    info = store.info("s")
    assert (info.cache_hits, info.cache_misses) == (4, 2)


def test_cache_evicts_least_recently_used_beyond_its_bound(store_factory):
    s = store_factory(CacheLimits(max_bytes=2500))
    for key in ("a", "b"):
        s.cache_put("s", key, b"x" * 1000)
    assert s.cache_get("s", "a") is not None  # a is now more recent than b
    s.cache_put("s", "c", b"y" * 1000)
    assert s.cache_get("s", "b") is None
    assert s.cache_get("s", "a") is not None and s.cache_get("s", "c") is not None
    assert s.info("s").cache_bytes == 2000
    s.cache_put("other", "big", b"z" * 2000)  # the bound is per session
    assert s.cache_get("s", "a") is not None


def test_cache_put_many_stores_each_value_and_keeps_the_bound(store_factory):
    s = store_factory(CacheLimits(max_bytes=2500))
    s.cache_put("s", "old", b"o" * 1000)
    s.cache_put_many("s", [("a", b"a" * 1000), ("b", b"b" * 1000)])
    assert s.cache_get_many("s", ["old", "a", "b"]) == {"a": b"a" * 1000, "b": b"b" * 1000}
    assert s.info("s").cache_bytes == 2000  # the oldest entry made room
    s.cache_put_many("s", [])
    assert s.info("s").cache_entries == 2


def test_cache_entries_expire_after_ttl(store_factory):
    s = store_factory(CacheLimits(ttl_s=0.2))
    s.cache_put("s", "k", b"v")
    assert s.cache_get("s", "k") == b"v"
    time.sleep(0.35)
    assert s.cache_get("s", "k") is None
    s.cache_put("s", "k2", b"v2")
    s.cache_put("s", "k3", b"v3")
    time.sleep(0.35)
    s.cache_put("s", "k4", b"v4")  # expired entries no longer count towards the size
    assert (s.info("s").cache_entries, s.info("s").cache_bytes) == (1, 2)


def test_info_counts_turns_pages_and_bytes(store):
    store.append("s", turns(("user", "héllo"), ("assistant", "ok")))
    assert store.add_pages("s", 0, [{"index": 0}], 2, store.generation("s"))
    store.cache_put("s", "k", b"12345")
    info = store.info("s")
    assert (info.turns, info.pages, info.cursor) == (2, 1, 2)
    assert (info.cache_entries, info.cache_bytes) == (1, 5)
    assert info.turn_bytes == len("héllo".encode()) + 2
