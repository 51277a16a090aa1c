"""A session deleted (and perhaps created again) while another replica pages it."""

from __future__ import annotations

import sqlite3

from optical_memory.memory import OpticalMemory
from optical_memory.stores import NewTurn, Store
from optical_memory.stores.redis import RedisStore


def leftovers(store: Store, session_id: str) -> int:
    """Rows or keys of the session still in the store's own storage."""
    if isinstance(store, RedisStore):
        client = store._r
        return len(list(client.scan_iter(match=store._key(session_id, "*"))))
    with sqlite3.connect(store.path) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return sum(
            db.execute(f"SELECT COUNT(*) FROM {t} WHERE sid = ?", (session_id,)).fetchone()[0]
            for t in tables
        )


def old_turns(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"old {i} " + "x" * 10} for i in range(n)]


def new_turns(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"NEW {i} " + "lorem ipsum " * 16} for i in range(n)]


def test_a_replica_notices_the_session_was_created_again(store_factory):
    store = store_factory()
    a, b = OpticalMemory(store), OpticalMemory(store)
    a.extend("s", old_turns(20))
    a.plan("s")
    b.delete("s")
    b.extend("s", new_turns(20))
    fresh = OpticalMemory(store).plan("s")
    assert a.plan("s").to_dict()["pages"] == fresh.to_dict()["pages"]
    assert a.plan("s").pages[0].text_tokens == fresh.pages[0].text_tokens


def test_pages_laid_out_before_a_delete_are_never_written(store_factory, conversation):
    store = store_factory()
    a, b = OpticalMemory(store), OpticalMemory(store)
    a.extend("s", conversation(200))
    generation = store.generation("s")
    sealed_by_a = [r.to_json() for r in a.pages("s") if r.sealed]
    assert sealed_by_a
    b.delete("s")
    b.extend("s", new_turns(200))
    # A's pages, laid out before the delete, arrive now: refused
    assert not store.add_pages("s", 0, sealed_by_a, 100, generation)
    assert store.pages("s") == []
    pages = b.pages("s")
    assert all(
        "NEW" in "".join(b.pager.text_of(r, b.store.turns("s")[r.first_turn :])) for r in pages
    )
    for record in pages:
        a.page_image("s", record)  # no PageDriftError: the pages are the new session's


def test_a_delete_leaves_nothing_behind(store_factory, conversation):
    store = store_factory()
    a, b = OpticalMemory(store), OpticalMemory(store)
    a.extend("s", conversation(120))
    a.messages("s", "q")  # pages sealed, PNGs cached, counters kept
    assert leftovers(store, "s") > 0
    b.delete("s")
    store.count_cache("s", hits=1)  # a late count from the other replica
    assert store.generation("s") == ""
    info = store.info("s")
    assert (info.turns, info.pages, info.cache_entries, info.cache_hits) == (0, 0, 0, 0)
    assert store.sessions() == []
    assert store.pinned("s") == []
    assert leftovers(store, "s") == 0
    store.append("s", [NewTurn("t", "user", "again")])
    assert store.info("s").cache_hits == 0
