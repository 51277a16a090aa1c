"""Store fixtures shared by the store, memory and reliability tests.

Redis runs use the real server at 127.0.0.1:6379 (database 15) under a key prefix
of their own, removed afterwards; they are skipped when no server answers there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from optical_memory.stores import CacheLimits, Store
from optical_memory.stores.redis import RedisStore
from optical_memory.stores.sqlite import SQLiteStore

REDIS_URL = "redis://127.0.0.1:6379/15"


def redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def wipe_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    if not redis_available():
        pytest.skip(f"no Redis server at {REDIS_URL}")
    prefix = f"omtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    wipe_prefix(REDIS_URL, prefix)


def make_store(kind: str, tmp_path, request, cache: CacheLimits | None = None) -> Store:
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "memory.sqlite3", cache=cache)
    prefix = request.getfixturevalue("redis_prefix")
    return RedisStore(REDIS_URL, prefix=prefix, cache=cache)


@pytest.fixture(params=["sqlite", "redis"])
def store_kind(request) -> str:
    return request.param


@pytest.fixture
def store_factory(store_kind, tmp_path, request) -> Iterator[Callable[..., Store]]:
    """Opens stores of the parametrised kind on one file / key prefix; closes them afterwards."""
    opened: list[Store] = []

    def factory(cache: CacheLimits | None = None) -> Store:
        opened.append(make_store(store_kind, tmp_path, request, cache))
        return opened[-1]

    yield factory
    for s in opened:
        s.close()


@pytest.fixture
def store(store_factory) -> Store:
    return store_factory()
