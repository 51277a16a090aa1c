"""Fixtures shared by the test modules: stores, a synthetic conversation, a tiny checkpoint.

Test modules take these as fixtures and import nothing from each other or from here.

Redis runs use the real server at 127.0.0.1:6379 (database 15) under a key prefix
of their own, removed afterwards; they are skipped when no server answers there.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from optical_memory.stores import CacheLimits, Store
from optical_memory.stores.redis import RedisStore
from optical_memory.stores.sqlite import SQLiteStore

REDIS_URL = "redis://127.0.0.1:6379/15"

WORDS = (
    *("launch", "date", "March", "budget", "review", "server", "Redis", "page", "vision"),
    *("memory", "token", "window", "décision", "réunion", "Termin", "Fenster"),
    *("记忆", "窗口", "память", "окно"),
)


def _conversation(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "role": ("user", "assistant")[i % 2],
            "content": f"[{i}] " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 90))),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def conversation() -> Callable[..., list[dict[str, str]]]:
    """`conversation(n, seed=0)`: n alternating user/assistant turns of 20 to 90 random words
    (a few of them French, German, Chinese, Russian), each content starting with `[i] `."""
    return _conversation


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random DeepSeek-OCR checkpoint (encoder, decoder, tokenizer); read-only."""
    from optical_memory.backends.deepseek_ocr.testing import write_checkpoint  # needs torch

    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


# --------------------------------------------------------------------------- stores
def _redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _wipe_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis database the tests use (skipping is `redis_prefix`'s job)."""
    return REDIS_URL


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix on `redis_url`, wiped afterwards; skips the test without a server."""
    if not _redis_available():
        pytest.skip(f"no Redis server at {REDIS_URL}")
    prefix = f"omtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    _wipe_prefix(REDIS_URL, prefix)


def _make_store(kind: str, tmp_path, request, cache: CacheLimits | None = None) -> Store:
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
        opened.append(_make_store(store_kind, tmp_path, request, cache))
        return opened[-1]

    yield factory
    for s in opened:
        s.close()


@pytest.fixture
def store(store_factory) -> Store:
    return store_factory()


# --------------------------------------------------------------------------- model endpoints
@pytest.fixture
def openai_server():
    """A started `optical_memory.testing.OpenAITestServer` (model "test-model") answering
    "The launch is on March 3rd."; its `requests` hold the JSON bodies it received."""
    from optical_memory.testing import OpenAITestServer

    with OpenAITestServer(reply="The launch is on March 3rd.") as server:
        yield server
