"""Fixtures shared by the test modules: stores, a synthetic conversation, a tiny checkpoint.

Test modules take these as fixtures and import nothing from each other or from here.

Redis runs use the real server at 127.0.0.1:6379 (database 15) under a key prefix
of their own, removed afterwards; they are skipped when no server answers there. Tests that
need a server of their own (settings, restarts, kill -9, a hung or stopped server) start
redis-server processes with `redis_servers` instead. A module that sets
`STORE_ON_CLUSTER = True` runs its `store` / `store_factory` tests on a three-master Redis
Cluster too (`redis_cluster`, started once per session on free loopback ports).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
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
    from optical_memory.stores.redis import _client

    client = _client(url, {})  # a cluster's scan visits every node
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
    if kind == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
        return RedisStore(url, prefix=request.getfixturevalue("cluster_prefix"), cache=cache)
    prefix = request.getfixturevalue("redis_prefix")
    return RedisStore(REDIS_URL, prefix=prefix, cache=cache)


def pytest_generate_tests(metafunc) -> None:
    """`store_kind`: sqlite and redis, and redis-cluster in modules with STORE_ON_CLUSTER."""
    if "store_kind" in metafunc.fixturenames:
        kinds = ["sqlite", "redis"]
        if getattr(metafunc.module, "STORE_ON_CLUSTER", False):
            kinds.append("redis-cluster")
        metafunc.parametrize("store_kind", kinds, indirect=True)


@pytest.fixture
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


# --------------------------------------------------------------------------- own Redis servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server on a free loopback port with its own directory; no persistence unless
    `args` ask for it (later arguments win). `start` again after `stop` or `kill` restarts it
    on the same port and directory (it loads whatever it persisted there)."""

    def __init__(self, directory: Path, args: tuple[str, ...]) -> None:
        self.port = _free_port()
        self.dir = directory / f"redis-{self.port}"
        self.dir.mkdir()
        self.args = args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, socket_timeout=5)

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            for _ in range(200):
                if self.proc.poll() is not None:
                    break  # exited: bad arguments, or the port was taken meanwhile
                try:
                    client.ping()  # LOADING (reading its AOF or RDB) is a ConnectionError
                    return self
                except redis.ConnectionError:
                    time.sleep(0.025)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def pause(self) -> None:
        """SIGSTOP: the server hangs, connections stay open, calls time out."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """kill -9: no shutdown, no final save."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM by its pid (after a SIGCONT, in case it is paused); nothing if not running."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_servers(tmp_path) -> Iterator[Callable[..., RedisServer]]:
    """`redis_servers(*args)`: a started `RedisServer` of this test's own, extra redis-server
    arguments such as "--maxmemory", "30mb" or "--appendonly", "yes" appended; each is
    stopped afterwards. Skips the test when redis-server is not installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    servers: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        servers.append(RedisServer(tmp_path, args))
        return servers[-1].start()

    yield start
    for server in servers:
        server.stop()


class RedisClusterServers:
    """A Redis Cluster of three masters (no replicas) on free loopback ports, each a
    `RedisServer` with cluster mode on, joined by `redis-cli --cluster create`."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        # the cluster bus port is given: by default it is the port + 10000, past 65535 for many
        # free ports
        self.nodes = [
            RedisServer(
                directory,
                ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-port", str(_free_port())),
            )
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        """The store URL of the cluster (any node seeds it)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisClusterServers:
        try:
            for node in self.nodes:
                node.start()
        except RuntimeError:
            self.stop()  # the nodes that did start
            raise
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=False, capture_output=True, text=True, timeout=60,
        )
        if create.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout}{create.stderr}")
        for _ in range(400):  # until every node has seen the others and serves all slots
            states = [n.client().cluster("INFO") for n in self.nodes]  # parsed by redis-py
            if all(state.get("cluster_state") == "ok" for state in states):
                return self
            time.sleep(0.025)
        self.stop()
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisClusterServers]:
    """A started three-master `RedisClusterServers`, shared by the session's tests (each uses
    a key prefix of its own: `cluster_prefix`); stopped by pid at the end. Skips the test when
    redis-server or redis-cli is not installed."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"a Redis Cluster needs {' and '.join(missing)}, not installed")
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_prefix(redis_cluster) -> Iterator[str]:
    """A fresh key prefix on `redis_cluster`, wiped afterwards."""
    prefix = f"omtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    _wipe_prefix(redis_cluster.url, prefix)


# --------------------------------------------------------------------------- model endpoints
@pytest.fixture
def openai_server():
    """A started `optical_memory.testing.OpenAITestServer` (model "test-model") answering
    "The launch is on March 3rd."; its `requests` hold the JSON bodies it received."""
    from optical_memory.testing import OpenAITestServer

    with OpenAITestServer(reply="The launch is on March 3rd.") as server:
        yield server
