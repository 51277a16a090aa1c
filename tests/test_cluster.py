"""Redis Cluster: a three-master cluster started on loopback ports (conftest `redis_cluster`).

The store suite itself runs on the cluster through the `store` fixture (test_stores.py and the
cache tests set STORE_ON_CLUSTER); these tests check what is particular to a cluster.
"""

from __future__ import annotations

import pytest
from redis.exceptions import RedisClusterException

from optical_memory.memory import OpticalMemory
from optical_memory.stores import StoreConfigError, open_store, parse_store_url
from optical_memory.stores.base import session_key
from optical_memory.stores.redis import RedisStore


def _slot(client, key: bytes | str) -> int:
    return int(client.cluster_keyslot(key))


def test_every_key_of_a_session_lives_in_one_slot(redis_cluster, cluster_prefix, conversation):
    store = RedisStore(redis_cluster.url, prefix=cluster_prefix)
    assert store.cluster
    mem = OpticalMemory(store)
    sessions = ["alice", "bob", "{bob}", "ü/😀"]
    for sid in sessions:
        mem.extend(sid, conversation(40))
        mem.pin(sid, mem.turns(sid)[3].turn_id)
        mem.messages(sid, "When is the launch?")  # pages sealed, PNGs cached, counters kept
        store.cache_put(sid, "k", b"value")
        store.count_cache(sid, hits=1)
        assert store.info(sid).pages > 0
    client = store.client
    keys = [k.decode() for k in client.scan_iter(match=f"{cluster_prefix}:*", count=1000)]
    by_session: dict[str, set[int]] = {}
    for key in keys:
        rest = key.removeprefix(cluster_prefix + ":")
        if rest in ("sessions", "store"):  # the store's own keys, outside any session
            continue
        assert rest.startswith("{"), f"key {key!r} carries no session's hash tag"
        tag = rest[1 : rest.index("}")]
        by_session.setdefault(tag, set()).add(_slot(client, key))
    assert set(by_session) == {session_key(sid) for sid in sessions}
    assert all(len(slots) == 1 for slots in by_session.values()), by_session
    assert len({next(iter(s)) for s in by_session.values()}) > 1  # sessions spread over slots
    # a script or transaction that named keys of two sessions would be refused: the tests
    # above would have failed with CROSSSLOT
    with pytest.raises(RedisClusterException, match="same slot"):
        pipe = client.pipeline(transaction=True)
        pipe.get(store.key("alice", "meta"))
        pipe.get(store.key("bob", "meta"))
        pipe.execute()
    mem.close()


def test_cluster_urls(redis_cluster, cluster_prefix):
    assert parse_store_url("redis+cluster://127.0.0.1:7000")[0] == "redis"
    assert parse_store_url("rediss+cluster://:pw@10.0.0.1:7000/0")[0] == "redis"
    with pytest.raises(ValueError, match="database 0 only"):
        parse_store_url("redis+cluster://127.0.0.1:7000/3")
    with pytest.raises(ValueError, match="database 0 only"):
        parse_store_url("redis+cluster://127.0.0.1:7000?cache=2")
    with pytest.raises(ValueError, match="must be followed by '//'"):
        parse_store_url("redis+cluster:127.0.0.1:7000")
    store = open_store(redis_cluster.url)
    assert isinstance(store, RedisStore) and store.cluster
    store.close()


def test_a_primary_that_may_evict_the_turn_log_is_refused(redis_cluster, cluster_prefix):
    node = redis_cluster.nodes[1].client()
    node.config_set("maxmemory-policy", "allkeys-lru")
    try:
        store = RedisStore(redis_cluster.url, prefix=cluster_prefix)
        with pytest.raises(StoreConfigError, match="allkeys-lru"):
            store.turn_count("s")
        store.close()
    finally:
        node.config_set("maxmemory-policy", "noeviction")
        node.close()
