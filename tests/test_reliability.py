"""Reliability: concurrent writers, processes killed mid-work, Redis going away and coming back."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optical_memory.memory import OpticalMemory
from optical_memory.policy import Policy
from optical_memory.stores import DataLossError, StoreUnavailableError
from optical_memory.stores.redis import RedisStore

ROOT = Path(__file__).resolve().parents[1]

_APPENDER = textwrap.dedent(
    """
    import sys
    from optical_memory.memory import OpticalMemory
    from optical_memory.stores.redis import RedisStore
    url, prefix, name, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = RedisStore(url, prefix=prefix) if url.startswith("redis") else url
    mem = OpticalMemory(store)
    for i in range(n):
        mem.append("shared", "user", f"{name} says {i}", turn_id=f"{name}-{i}")
        if i % 10 == 0:  # a client retry: must not store the turn twice
            mem.append("shared", "user", f"{name} says {i}", turn_id=f"{name}-{i}")
    """
)


def _store_arg(kind: str, tmp_path: Path, request) -> tuple[str, str]:
    if kind == "sqlite":
        return str(tmp_path / "memory.sqlite3"), "-"
    return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")


def _open(kind: str, url: str, prefix: str) -> OpticalMemory:
    return OpticalMemory(RedisStore(url, prefix=prefix) if kind == "redis" else url)


def test_two_processes_append_500_turns_each(store_kind, tmp_path, request):
    url, prefix = _store_arg(store_kind, tmp_path, request)
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, url, prefix, name, "500"], cwd=ROOT)
        for name in ("a", "b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    turns = _open(store_kind, url, prefix).turns("shared")
    assert len(turns) == 1000
    assert [t.index for t in turns] == list(range(1000))
    for name in ("a", "b"):
        mine = [t.content for t in turns if t.turn_id.startswith(f"{name}-")]
        assert mine == [f"{name} says {i}" for i in range(500)]


_RENDERER = textwrap.dedent(
    """
    import sys
    from optical_memory.memory import OpticalMemory
    from optical_memory.policy import Policy
    from optical_memory.stores.redis import RedisStore
    url, prefix = sys.argv[1], sys.argv[2]
    store = RedisStore(url, prefix=prefix) if url.startswith("redis") else url
    mem = OpticalMemory(store, policy=Policy(recent_turns=4, recent_tokens=400))
    print("ready", flush=True)
    for page in mem.pages("s", progress=False):
        mem.page_image("s", page)
        print("rendered", page.index, flush=True)
    """
)


@pytest.mark.parametrize("kill_after", ["ready", "rendered"])  # while paging / while rendering
def test_process_killed_mid_work_loses_nothing(
    store_kind, tmp_path, request, kill_after, conversation
):
    url, prefix = _store_arg(store_kind, tmp_path, request)
    policy = Policy(recent_turns=4, recent_tokens=400)
    mem = _open(store_kind, url, prefix)
    mem.policy = policy
    msgs = conversation(400, seed=3)
    mem.extend("s", msgs)
    proc = subprocess.Popen(
        [sys.executable, "-c", _RENDERER, url, prefix], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    if kill_after == "rendered":
        assert proc.stdout.readline().startswith("rendered")  # paged, one page cached
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # nothing lost: every turn is there, and the next call finishes the work
    assert [t.to_message() for t in mem.turns("s")] == msgs
    pages = mem.pages("s")
    images = [mem.page_image("s", p) for p in pages]
    assert all(image.size == (1280, 1280) for image in images)
    # the pages are those a fresh, uninterrupted memory makes of the same turns
    fresh = OpticalMemory(tmp_path / "fresh.sqlite3", policy=policy)
    fresh.extend("s", msgs)
    assert [(p.start, p.end, p.content_hash) for p in fresh.pages("s")] == [
        (p.start, p.end, p.content_hash) for p in pages
    ]


def test_redis_unreachable_then_back(redis_servers):
    server = redis_servers()  # without persistence
    url = server.url
    mem = OpticalMemory(RedisStore(url, prefix="rel", timeout_s=0.5))
    mem.append("s", "user", "before", turn_id="t0")

    server.pause()  # the server hangs: calls time out
    with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{server.port}.*unreachable"):
        mem.append("s", "user", "during", turn_id="t1")
    server.resume()

    # back: the retry with the same turn id stores the turn exactly once, even if the
    # timed-out call reached the server after all
    mem.append("s", "user", "during", turn_id="t1")
    mem.append("s", "user", "after", turn_id="t2")
    assert [t.content for t in mem.turns("s")] == ["before", "during", "after"]

    server.stop()  # down: a clear error for reads and writes, nothing reported stored
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        mem.append("s", "user", "lost", turn_id="t3")
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        mem.plan("s")

    server.start()  # restarted without persistence: the turns are gone, and the client
    with pytest.raises(DataLossError, match="marker 'rel:store' is gone"):  # says so
        mem.append("s", "user", "again", turn_id="t4")
    with pytest.raises(DataLossError):  # from then on, reads included
        mem.turns("s")
    # a new store on the emptied server starts afresh
    fresh = OpticalMemory(RedisStore(url, prefix="rel", timeout_s=0.5))
    fresh.append("s", "user", "again", turn_id="t4")
    assert [t.content for t in fresh.turns("s")] == ["again"]
