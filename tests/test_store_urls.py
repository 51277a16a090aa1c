"""Store URLs: which store each form opens, clear errors for the rest (nothing created), the
OPTICAL_MEMORY_STORE default, and what a Redis that cannot be reached says for reads and writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from optical_memory.memory import OpticalMemory
from optical_memory.stores import (
    STORE_ENV,
    StoreUnavailableError,
    open_store,
    parse_store_url,
)
from optical_memory.stores.redis import RedisStore
from optical_memory.stores.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("url", "kind", "target"),
    [
        ("redis://127.0.0.1:6379/14", "redis", "redis://127.0.0.1:6379/14"),
        ("redis://127.0.0.1", "redis", "redis://127.0.0.1"),
        ("rediss://cache.example:6380/2", "redis", "rediss://cache.example:6380/2"),
        (
            "redis://:secret@host:6379/3?socket_keepalive=true",
            "redis",
            "redis://:secret@host:6379/3?socket_keepalive=true",
        ),
        ("REDIS://host/1", "redis", "redis://host/1"),
        ("unix:///run/redis.sock", "redis", "unix:///run/redis.sock"),
        ("sqlite:///var/lib/om/memory.sqlite3", "sqlite", "/var/lib/om/memory.sqlite3"),
        ("sqlite://data/memory.sqlite3", "sqlite", "data/memory.sqlite3"),
        ("/var/lib/om/memory.sqlite3", "sqlite", "/var/lib/om/memory.sqlite3"),
        ("memory.sqlite3", "sqlite", "memory.sqlite3"),
        ("~/om.sqlite3", "sqlite", "~/om.sqlite3"),
    ],
)
def test_valid_forms(url, kind, target):
    assert parse_store_url(url) == (kind, target)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis:127.0.0.1:6379/14", "'redis:' must be followed by '//'"),
        ("rediss:host:6379", "'rediss:' must be followed by '//'"),
        ("sqlite:memory.sqlite3", "'sqlite:' must be followed by '//'"),
        ("unix:/run/redis.sock", "'unix:' must be followed by '//'"),
        ("http://127.0.0.1:6379/0", "unknown scheme 'http://'"),
        ("postgres://user@host/db", "unknown scheme 'postgres://'"),
        ("file:///tmp/memory.sqlite3", "unknown scheme 'file://'"),
        ("sqlite://", "no file path"),
        ("sqlite:///", "no file path"),
        ("unix://", "no socket path"),
        ("redis://host:99999/0", "the port must be a number"),
        ("redis://host:port/0", "the port must be a number"),
        ("redis://host:6379/fourteen", "the database must be a number, got 'fourteen'"),
        ("", "it is empty"),
    ],
)
def test_bad_urls_are_errors_and_create_nothing(url, why, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="valid forms: redis://") as info:
        open_store(url)
    assert why in str(info.value)
    assert f"invalid store URL {url!r}" in str(info.value)
    with pytest.raises(ValueError, match="invalid store URL"):
        OpticalMemory(url)
    assert list(tmp_path.iterdir()) == []  # no file, no directory


def test_password_is_not_in_the_error():
    with pytest.raises(ValueError) as info:
        open_store("redis://:hunter2@host:port/0")
    assert "hunter2" not in str(info.value) and "redis://:***@host:port/0" in str(info.value)


def test_sqlite_forms_open_files_where_they_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url, path in [
        ("sqlite://rel/a.sqlite3", tmp_path / "rel" / "a.sqlite3"),
        (f"sqlite://{tmp_path}/b.sqlite3", tmp_path / "b.sqlite3"),
        (str(tmp_path / "c.sqlite3"), tmp_path / "c.sqlite3"),
        (tmp_path / "redis:d.sqlite3", tmp_path / "redis:d.sqlite3"),  # a Path is a path
    ]:
        store = open_store(url)
        assert isinstance(store, SQLiteStore)
        store.close()
        assert path.is_file(), url


def test_redis_forms_open_redis_stores():
    store = open_store("redis://127.0.0.1:6379/14")  # connects on first use only
    assert isinstance(store, RedisStore) and store.url == "redis://127.0.0.1:6379/14"
    store.close()


def test_env_sets_the_default_store(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTICAL_MEMORY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(STORE_ENV, f"sqlite://{tmp_path}/env.sqlite3")
    with OpticalMemory() as mem:
        mem.append("s", "user", "hello")
    assert (tmp_path / "env.sqlite3").is_file() and not (tmp_path / "home").exists()
    with OpticalMemory(tmp_path / "explicit.sqlite3") as mem:  # an explicit store wins
        assert mem.sessions() == []

    monkeypatch.setenv(STORE_ENV, "redis://127.0.0.1:6379/14")
    store = open_store()
    assert isinstance(store, RedisStore) and store.url == "redis://127.0.0.1:6379/14"
    store.close()

    monkeypatch.setenv(STORE_ENV, "redis:127.0.0.1:6379/14")
    with pytest.raises(ValueError, match=r"^\$OPTICAL_MEMORY_STORE: invalid store URL"):
        open_store()

    monkeypatch.setenv(STORE_ENV, "")  # empty: unset
    store = open_store()
    assert isinstance(store, SQLiteStore) and store.path == tmp_path / "home" / "memory.sqlite3"
    store.close()


# --------------------------------------------------------------------------- Redis away
def test_unreachable_redis_says_whether_a_read_or_a_write_failed(redis_servers):
    server = redis_servers()
    mem = OpticalMemory(RedisStore(server.url, timeout_s=0.5))
    mem.append("s", "user", "hello", turn_id="t0")
    server.stop()

    reads = {
        "turns": lambda: mem.turns("s"),
        "plan": lambda: mem.plan("s"),
        "sessions": mem.sessions,
        "store.turns": lambda: mem.store.turns("s"),
        "store.pages": lambda: mem.store.pages("s"),
        "store.info": lambda: mem.store.info("s"),
        "store.cache_get": lambda: mem.store.cache_get("s", "k"),
    }
    for name, read in reads.items():
        with pytest.raises(StoreUnavailableError) as info:
            read()
        text = str(info.value)
        assert f"127.0.0.1:{server.port}" in text and "unreachable during a read" in text, name
        assert "retry" not in text and "stored" not in text and "turn id" not in text, name

    writes = {
        "append": lambda: mem.append("s", "user", "lost", turn_id="t1"),
        "store.cache_put": lambda: mem.store.cache_put("s", "k", b"v"),
    }
    for name, write in writes.items():
        with pytest.raises(StoreUnavailableError) as info:
            write()
        text = str(info.value)
        assert "unreachable during a write" in text, name
        assert "its outcome is unknown" in text, name  # a write may have run after all
    with pytest.raises(StoreUnavailableError, match="retry with the same turn ids"):
        mem.append("s", "user", "lost", turn_id="t1")


def test_cli_read_from_unreachable_redis(redis_servers):
    server = redis_servers()
    server.stop()
    for command in (["turns", "s"], ["sessions"], ["plan", "s"]):
        done = subprocess.run(
            [sys.executable, "-m", "optical_memory", *command, "--store", server.url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, command
        assert "unreachable during a read" in done.stderr, command
        assert "retry" not in done.stderr, command
