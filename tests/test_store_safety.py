"""No silent loss: the Redis turn log is never evictable by the cache, data that vanished under
a client is a DataLossError, AOF keeps acknowledged turns through kill -9, a timed-out append
says its outcome is unknown and carries the turn ids to retry with; SQLite files are private.

Every Redis test starts redis-server processes of its own on free loopback ports, with the
settings it needs (the `redis_servers` fixture), and they are stopped by their pid.
"""

from __future__ import annotations

import os
import stat
import time
import warnings
from pathlib import Path

import pytest

from optical_memory.memory import OpticalMemory
from optical_memory.stores import (
    CacheLimits,
    DataLossError,
    StoreConfigError,
    StoreUnavailableError,
    StoreWarning,
    open_store,
    parse_store_url,
)
from optical_memory.stores.redis import RedisStore
from optical_memory.stores.sqlite import SQLiteStore


def _messages(session: int, n: int = 40) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{session}.{i} " + "w " * 100} for i in range(n)]


# --------------------------------------------------------------------------- eviction
def test_allkeys_policies_are_refused_at_connect_and_nothing_is_written(redis_servers):
    server = redis_servers("--maxmemory", "30mb", "--maxmemory-policy", "allkeys-lru")
    for url in (server.url, server.url + "?cache=1"):  # another database shares the memory
        store = RedisStore(url)  # connects on first use only
        mem = OpticalMemory(store)
        with pytest.raises(StoreConfigError) as info:
            mem.extend("c0", _messages(0))
        text = str(info.value)
        assert f"127.0.0.1:{server.port}" in text and "maxmemory-policy allkeys-lru" in text
        assert "turn log" in text and "noeviction" in text and "volatile-" in text
        assert "cache_url=" in text and "server of its own" in text
        with pytest.raises(StoreConfigError):  # reads too: nothing is used on such a server
            mem.sessions()
        store.close()
    client = server.client()
    with server.client(1) as other:
        assert client.dbsize() == 0 and other.dbsize() == 0  # nothing written anywhere
    for policy in ("allkeys-lfu", "allkeys-random"):
        client.config_set("maxmemory-policy", policy)
        with pytest.raises(StoreConfigError, match=policy):
            RedisStore(server.url).turn_count("s")
    # set right, the same store object works: the refusal is not remembered
    store = RedisStore(server.url)
    with pytest.raises(StoreConfigError):
        store.turn_count("s")
    client.config_set("maxmemory-policy", "noeviction")
    assert store.turn_count("s") == 0 and store.eviction_policy == "noeviction"
    store.close()
    client.close()


@pytest.mark.parametrize("layout", ["volatile-lru", "noeviction", "cache server"])
def test_the_turn_logs_survive_cache_writes(redis_servers, layout):
    """The issue's reproduction (maxmemory 30 MB, 40 sessions of 40 turns, then 60 cache
    writes of 1 MiB), under each layout that keeps the turn log: every turn log survives."""
    if layout == "volatile-lru":  # the cache values carry a TTL: they alone are evictable
        server = redis_servers("--maxmemory", "30mb", "--maxmemory-policy", "volatile-lru")
        evicting, store = server, RedisStore(server.url, cache=CacheLimits(ttl_s=3600))
    elif layout == "noeviction":  # the cache's own bound keeps it under maxmemory
        server = redis_servers("--maxmemory", "30mb", "--maxmemory-policy", "noeviction")
        evicting, store = None, RedisStore(server.url, cache=CacheLimits(max_bytes=8 << 20))
    else:  # the cache on a server of its own, which may evict anything
        server = redis_servers("--maxmemory", "30mb", "--maxmemory-policy", "noeviction")
        evicting = redis_servers("--maxmemory", "30mb", "--maxmemory-policy", "allkeys-lru")
        store = RedisStore(f"{server.url}?cache={evicting.url}")
        assert store.url == server.url and store.cache_url == evicting.url
    mem = OpticalMemory(store)
    for s in range(40):
        mem.extend(f"c{s}", [{**m, "turn_id": f"t{i}"} for i, m in enumerate(_messages(s))])
    for k in range(60):
        store.cache_put("busy", f"k{k}", os.urandom(1 << 20))
    assert [store.turn_count(f"c{s}") for s in range(40)] == [40] * 40
    assert store.turns("c7")[39].content == _messages(7)[39]["content"]
    assert store.cache_get("busy", "k59") is not None  # the newest entry is there
    if evicting is not None:  # the server did evict: cache values only
        with evicting.client() as client:
            assert client.info("stats")["evicted_keys"] > 0
    if layout == "cache server":  # no cache key beside the turn log
        with server.client() as client:
            assert not list(client.scan_iter(match="om:*:c:*"))
            assert not list(client.scan_iter(match="om:*:lru"))
    # a retry of every session stores nothing twice
    mem.extend("c3", [{**m, "turn_id": f"t{i}"} for i, m in enumerate(_messages(3))])
    assert store.turn_count("c3") == 40
    store.close()


def test_config_refused_reads_the_policy_from_info_else_warns(redis_servers):
    renamed = redis_servers(
        "--rename-command", "CONFIG", "", "--maxmemory", "30mb", "--maxmemory-policy", "allkeys-lru"
    )
    with pytest.raises(StoreConfigError, match="allkeys-lru"):  # from INFO memory
        RedisStore(renamed.url).turn_count("s")
    volatile = redis_servers("--rename-command", "CONFIG", "", "--maxmemory-policy", "volatile-lfu")
    store = RedisStore(volatile.url)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.turn_count("s") == 0
    assert store.eviction_policy == "volatile-lfu"
    store.close()
    # neither CONFIG nor INFO: the store says it could not check, assumes nothing, and works
    blind = redis_servers("--rename-command", "CONFIG", "", "--rename-command", "INFO", "")
    store = RedisStore(blind.url)
    mem = OpticalMemory(store)
    with pytest.warns(StoreWarning) as caught:
        mem.append("s", "user", "hello")
    (warning,) = [w for w in caught if issubclass(w.category, StoreWarning)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mem.append("s", "user", "again")  # checked once
    text = str(warning.message)
    assert "cannot check maxmemory-policy" in text and "CONFIG GET is refused" in text
    assert "noeviction or a volatile-* policy" in text and "not assumed" in text
    assert store.eviction_policy is None
    assert [t.content for t in mem.turns("s")] == ["hello", "again"]
    store.close()


# --------------------------------------------------------------------------- the cache's place
def test_cache_url_forms(redis_servers, tmp_path, monkeypatch):
    monkeypatch.delenv("OPTICAL_MEMORY_STORE", raising=False)
    server = redis_servers()
    store = RedisStore(server.url + "?cache=3")  # a database number: the same server
    assert store.url == server.url and store.cache_url == f"redis://127.0.0.1:{server.port}/3"
    kwarg = RedisStore(server.url, cache_url=f"redis://127.0.0.1:{server.port}/3")
    assert kwarg.cache_url == store.cache_url
    with pytest.raises(ValueError, match="given twice"):
        RedisStore(server.url + "?cache=3", cache_url=server.url)
    # through open_store and OpticalMemory: turns in database 0, cache entries in database 3
    mem = OpticalMemory(server.url + "?cache=3")
    mem.append("s", "user", "hello")
    mem.store.cache_put("s", "k", b"value")
    assert mem.store.cache_get_many("s", ["k", "x"]) == {"k": b"value"}
    assert mem.store.info("s").cache_entries == 1
    with server.client(0) as log, server.client(3) as cache:
        assert list(log.scan_iter(match="om:*:c:*")) == [] and log.exists("om:store")
        assert len(list(cache.scan_iter(match="om:*:c:*"))) == 1
        assert cache.keys("om:*:turns") == [] and not cache.exists("om:store")
        assert mem.delete("s")  # both sides
        assert cache.dbsize() == 0
    mem.close()
    opened = open_store(server.url, cache_url="5")
    assert opened.cache_url == f"redis://127.0.0.1:{server.port}/5"
    opened.close()
    for store_url in (tmp_path / "m.sqlite3", None):
        with pytest.raises(ValueError, match="cache_url= is for Redis stores"):
            open_store(store_url, cache_url="redis://127.0.0.1:6379/1")
    store.close()
    kwarg.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0?cache=1",
        "redis://h:6379/0?cache=redis://other:6380/2",
        "redis://h:6379/0?cache=rediss://:pw@other:6380/0",
        "unix:///run/redis.sock?db=0&cache=unix:///run/cache.sock",
    ],
)
def test_store_urls_with_a_cache(url):
    assert parse_store_url(url) == ("redis", url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0?cache=sqlite:///tmp/x",
        "redis://h:6379/0?cache=postgres://other/0",
        "redis://h:6379/0?cache=",
        "redis://h:6379/0?cache=1&cache=2",
        "redis://h:6379/0?cache=redis://other:6380/0%3Fcache%3D1",
    ],
)
def test_bad_cache_urls_are_refused(url):
    with pytest.raises(ValueError, match="invalid store URL.*cache="):
        parse_store_url(url)


def test_an_unreachable_cache_server_is_named(redis_servers):
    server, cache = redis_servers(), redis_servers()
    store = RedisStore(server.url, cache_url=cache.url, timeout_s=0.5)
    mem = OpticalMemory(store)
    mem.append("s", "user", "hello")
    cache.stop()
    with pytest.raises(StoreUnavailableError) as info:
        store.cache_get("s", "k")
    assert f"127.0.0.1:{cache.port}" in str(info.value) and "during a read" in str(info.value)
    assert [t.content for t in mem.turns("s")] == ["hello"]  # the turn log is unaffected
    store.close()


# --------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_aof_keeps_acknowledged_turns_through_kill_9(redis_servers, fsync):
    server = redis_servers("--appendonly", "yes", "--appendfsync", fsync)
    mem = OpticalMemory(RedisStore(server.url, timeout_s=2))
    for s in range(3):
        mem.extend(f"s{s}", _messages(s, 30))
    for i in range(20):
        mem.append("s0", "assistant", f"reply {i}", turn_id=f"r{i}")
    server.kill()  # no shutdown, no final save
    server.start()  # the same port and directory: it loads its AOF
    # the long-lived client goes on (the marker and its counter came back), and a new one agrees
    assert [len(mem.turns(f"s{s}")) for s in range(3)] == [50, 30, 30]
    assert mem.append("s0", "user", "after", turn_id="a").index == 50
    fresh = OpticalMemory(RedisStore(server.url))
    assert [t.content for t in fresh.turns("s0")][28:] == [
        *(m["content"] for m in _messages(0, 30)[28:]),
        *(f"reply {i}" for i in range(20)),
        "after",
    ]
    mem.close()
    fresh.close()


def test_a_restart_without_persistence_is_data_loss_not_a_new_start(redis_servers):
    server = redis_servers()
    mem = OpticalMemory(RedisStore(server.url, timeout_s=2))
    mem.extend("s", _messages(0, 10))
    server.kill()
    server.start()  # empty
    with pytest.raises(DataLossError) as info:  # the next call, a read
        mem.turns("s")
    text = str(info.value)
    assert f"127.0.0.1:{server.port}" in text and "marker 'om:store' is gone" in text
    assert "restarted without persistence" in text and "refuses" in text
    with pytest.raises(DataLossError):  # no append restarts the session at index 0
        mem.append("s", "user", "again", turn_id="again")
    with pytest.raises(DataLossError):
        mem.sessions()
    with server.client() as client:
        assert client.dbsize() == 0  # nothing written
    # a new client cannot know what was there: to it the server is a new, empty store
    fresh = OpticalMemory(RedisStore(server.url))
    assert fresh.append("s", "user", "again").index == 0
    fresh.close()


def test_an_older_snapshot_is_data_loss(redis_servers):
    """RDB only: a restart after kill -9 brings back the last snapshot, without the turns
    acknowledged since; the marker is there, but its write counter went back."""
    server = redis_servers("--dbfilename", "dump.rdb")
    mem = OpticalMemory(RedisStore(server.url, timeout_s=2))
    mem.extend("s", _messages(0, 10))
    with server.client() as client:
        client.save()
    mem.extend("s", _messages(1, 5))
    server.kill()
    server.start()
    with pytest.raises(DataLossError, match="write counter went back from 2 to 1"):
        mem.append("s", "user", "next", turn_id="next")
    with server.client() as client:
        assert client.llen(mem.store._key("s", "turns")) == 10  # the snapshot, nothing added


def test_a_flush_under_a_live_connection_is_data_loss_before_any_write(redis_servers):
    server = redis_servers()
    mem = OpticalMemory(RedisStore(server.url))
    mem.extend("s", _messages(0, 5))
    with server.client() as client:
        client.flushdb()
        with pytest.raises(DataLossError, match="marker 'om:store' is gone"):
            mem.append("t", "user", "a new session", turn_id="x")
        assert client.dbsize() == 0


def test_sessions_without_the_marker(redis_servers):
    """Sessions of this version but no marker: data loss. Sessions of a version without
    markers: adopted (the marker is written), and they read and grow as before."""
    server = redis_servers()
    mem = OpticalMemory(RedisStore(server.url))
    mem.extend("s", _messages(0, 5))
    mem.close()
    client = server.client()
    marker = client.hgetall("om:store")
    assert set(marker) == {b"id", b"created", b"seq"} and int(marker[b"seq"]) == 1
    client.delete("om:store")
    store = RedisStore(server.url)
    with pytest.raises(DataLossError, match="holds sessions written under store"):
        store.turn_count("s")
    store.close()

    # as an earlier version left them: no marker, no store id in the sessions
    for key in client.scan_iter(match="om:*:meta"):
        client.hdel(key, "store")
    mem = OpticalMemory(RedisStore(server.url))
    assert len(mem.turns("s")) == 5
    assert client.hget("om:store", "adopted") is not None
    assert mem.append("s", "user", "more").index == 5
    mem.close()
    client.close()


# --------------------------------------------------------------------------- timeouts
@pytest.mark.parametrize("paused", ["before the write", "during the write"])
def test_a_timed_out_append_has_an_unknown_outcome_and_its_turn_ids(
    redis_servers, monkeypatch, paused
):
    """The server hangs (SIGSTOP) for longer than the client's socket timeout, before the
    append is sent or after (then it runs when the server wakes): the error says the outcome
    is unknown and gives the turn ids; the retry with them stores every turn exactly once."""
    server = redis_servers()
    store = RedisStore(server.url, timeout_s=0.5)
    mem = OpticalMemory(store)
    mem.append("s", "user", "before", turn_id="t0")
    messages = _messages(1, 3)  # no turn ids: the memory makes them

    if paused == "before the write":
        server.pause()
    else:  # right after the marker check, before the append's round trip
        check = store._check_marker

        def check_then_hang(*args, **kwargs) -> None:
            check(*args, **kwargs)
            server.pause()

        monkeypatch.setattr(store, "_check_marker", check_then_hang)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        mem.extend("s", messages)
    assert time.monotonic() - started < 10
    monkeypatch.undo()
    err = info.value
    text = str(err)
    assert "unreachable during a write (append)" in text and "outcome is unknown" in text
    assert "may have been stored" in text and "retry with the same turn ids" in text
    assert len(err.turn_ids) == 3 and len(set(err.turn_ids)) == 3
    assert all(tid in text for tid in err.turn_ids)

    server.resume()
    key = store._key("s", "turns")
    with server.client() as client:  # what the server did once awake
        expected = 1 if paused == "before the write" else 4
        for _ in range(100):
            if client.llen(key) == expected:
                break
            time.sleep(0.02)
        assert client.llen(key) == expected

    again = mem.extend("s", messages, turn_ids=err.turn_ids)
    assert [t.index for t in again] == [1, 2, 3]
    assert [t.turn_id for t in mem.turns("s")] == ["t0", *err.turn_ids]
    assert [t.content for t in mem.turns("s")[1:]] == [m["content"] for m in messages]
    assert mem.extend("s", messages, turn_ids=err.turn_ids) == again  # and again: nothing new
    assert len(mem.turns("s")) == 4

    # one turn: the generated id is in the error too
    server.pause()
    with pytest.raises(StoreUnavailableError) as info:
        mem.append("s", "user", "one more")
    server.resume()
    (tid,) = info.value.turn_ids
    assert tid in str(info.value)
    assert mem.append("s", "user", "one more", turn_id=tid).index == 4
    assert len(mem.turns("s")) == 5
    store.close()


def test_appends_survive_a_script_flush(redis_servers, monkeypatch):
    """The append script is checked in the marker's round trip and loaded where missing; one
    flushed between that check and the write is loaded, and the write sent again."""
    server = redis_servers()
    store = RedisStore(server.url)
    mem = OpticalMemory(store)
    mem.append("s", "user", "first", turn_id="t0")
    client = server.client()
    client.script_flush()
    mem.append("s", "user", "second", turn_id="t1")
    check = store._check_marker

    def check_then_flush(*args, **kwargs) -> None:
        check(*args, **kwargs)
        client.script_flush()

    monkeypatch.setattr(store, "_check_marker", check_then_flush)
    mem.append("s", "user", "third", turn_id="t2")
    monkeypatch.undo()
    assert [t.turn_id for t in mem.turns("s")] == ["t0", "t1", "t2"]
    client.close()
    store.close()


def test_a_read_that_times_out_says_it_was_a_read(redis_servers):
    server = redis_servers()
    mem = OpticalMemory(RedisStore(server.url, timeout_s=0.5))
    mem.append("s", "user", "hello", turn_id="t0")
    server.pause()
    try:
        with pytest.raises(StoreUnavailableError) as info:
            mem.turns("s")
    finally:
        server.resume()
    text = str(info.value)
    assert "during a read" in text and "changes nothing" in text
    assert "outcome" not in text and info.value.turn_ids == ()
    mem.close()


# --------------------------------------------------------------------------- SQLite files
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_file_and_directories_it_creates_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "a" / "b" / "memory.sqlite3"
        store = SQLiteStore(path)
        OpticalMemory(store).append("s", "user", "hello")
        assert _mode(tmp_path / "a") == 0o700 and _mode(tmp_path / "a" / "b") == 0o700
        assert _mode(path) == 0o600
        assert _mode(path.with_name("memory.sqlite3-wal")) == 0o600
        store.close()

        # what exists is left as it is
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        existing = shared / "mine.sqlite3"
        SQLiteStore(existing).close()  # created: 0600
        existing.chmod(0o644)
        store = SQLiteStore(existing)
        OpticalMemory(store).append("s", "user", "hello")
        store.close()
        assert _mode(shared) == 0o755 and _mode(existing) == 0o644
    finally:
        os.umask(old)


def test_the_default_store_home_is_private(tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        monkeypatch.delenv("OPTICAL_MEMORY_STORE", raising=False)
        monkeypatch.setenv("OPTICAL_MEMORY_HOME", str(tmp_path / "home" / "om"))
        with OpticalMemory() as mem:
            mem.append("s", "user", "hello")
        assert _mode(tmp_path / "home") == 0o700 and _mode(tmp_path / "home" / "om") == 0o700
        assert _mode(tmp_path / "home" / "om" / "memory.sqlite3") == 0o600
    finally:
        os.umask(old)
