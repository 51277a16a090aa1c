"""Encoding pages through one queue for every session: the in-process queue's thread, and
`optical-memory worker` processes sharing a Redis stream (real Redis servers, real processes).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from optical_memory.backends.deepseek_ocr.backend import DeepSeekOCRBackend
from optical_memory.encode_queue import (
    GROUP,
    EncodeTimeoutError,
    EncodeWorker,
    LocalEncodeQueue,
    PageJob,
    parse_entry,
    stream_key,
)
from optical_memory.memory import OpticalMemory
from optical_memory.modes import MODES
from optical_memory.policy import Policy, Schedule
from optical_memory.stores.redis import RedisStore

ROOT = Path(__file__).resolve().parents[1]
# fixed tiers (small for the newest pages, then tiny): two tiers to batch apart
POLICY = Policy(
    planner="schedule",
    schedule=Schedule(((2, "small"), (1000, "tiny"))),
    recent_turns=3,
    recent_tokens=120,
    answer_tokens=8,
    min_compression=0,
)
QUERY = "When is the launch?"


@pytest.fixture(scope="module")
def model(checkpoint):
    from optical_memory.backends.deepseek_ocr.model import load_model

    return load_model(checkpoint, device="cpu")


def _memory(store, model, **options) -> OpticalMemory:
    return OpticalMemory(store, model=DeepSeekOCRBackend(model, **options), policy=POLICY)


def _alone(mem: OpticalMemory, session_id: str) -> list[torch.Tensor]:
    """The session's pages in context, each encoded alone (batch of one), oldest first."""
    plan = mem.plan(session_id, QUERY)
    records = {r.index: r for r in mem.pages(session_id)}
    encoder = mem.model.encoder
    return [
        encoder.encode(mem.page_image(session_id, records[p.index]), p.mode)
        for p in plan.in_context()
    ]


def _until(condition, what: str, limit_s: float = 120.0) -> None:
    """Wait for `condition()` (a state, not a duration, is what the tests check)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {limit_s:g} s")
        time.sleep(0.005)


def _contexts(mem: OpticalMemory, sessions: list[str]) -> tuple[dict, list[threading.Thread]]:
    results: dict[str, object] = {}

    def run(sid: str) -> None:
        try:
            results[sid] = mem.context(sid, QUERY)
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            results[sid] = exc

    threads = [threading.Thread(target=run, args=(sid,)) for sid in sessions]
    for t in threads:
        t.start()
    return results, threads


# --------------------------------------------------------------------------- in-process
def test_one_forward_pass_serves_several_sessions_with_the_tokens_of_each_alone(
    tmp_path, model, conversation
):
    mem = _memory(tmp_path / "m.sqlite3", model, encode_batch=16)
    sessions = ["alpha", "beta", "gamma"]
    for n, sid in enumerate(sessions):
        mem.extend(sid, conversation(30, seed=n))
    expected = {sid: _alone(mem, sid) for sid in sessions}
    wanted = sum(len(v) for v in expected.values())
    assert {p.mode for sid in sessions for p in mem.plan(sid, QUERY).in_context()} == {
        "tiny", "small"
    }
    queue = mem.backend.encode_queue
    with queue.hold():  # every session's pages queue up before the first forward pass
        results, threads = _contexts(mem, sessions)
        _until(lambda: queue.depth == wanted, f"{wanted} pages queued")
        assert mem.backend.encode_queue_depth == wanted
    for t in threads:
        t.join(timeout=120)
    stats = queue.stats()
    assert stats.pages == wanted and stats.failed == 0
    assert stats.batches == 2  # one per tier, each holding the pages of all three sessions
    assert stats.most_sessions_in_batch == 3
    assert mem.backend.encode_queue_depth == 0
    for sid in sessions:
        context = results[sid]
        assert not isinstance(context, Exception), context
        got = [s for s in context.segments if isinstance(s, torch.Tensor)]
        assert len(got) == len(expected[sid]) and context.encoded == len(got)
        for a, b in zip(got, expected[sid]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    again = mem.context("beta", QUERY)  # now from the cache
    assert again.encoded == 0
    mem.close()


def test_view_processes_give_the_tokens_of_each_page_alone_and_redo_an_unsound_image(
    tmp_path, model, conversation
):
    from optical_memory.cache import page_image_key

    mem = _memory(tmp_path / "m.sqlite3", model, view_processes=2)
    assert mem.backend.view_pool.processes == 2
    mem.extend("s", conversation(30))
    expected = _alone(mem, "s")  # also caches the sealed pages' images
    records = {r.index: r for r in mem.pages("s")}
    first = records[mem.plan("s", QUERY).in_context()[0].index]
    key = page_image_key(first.content_hash, first.fingerprint)
    sound = mem.store.cache_get("s", key)
    mem.store.cache_put("s", key, sound[:-100])  # truncated: refused in the view process
    context = mem.context("s", QUERY)
    got = [seg for seg in context.segments if isinstance(seg, torch.Tensor)]
    assert context.encoded == len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert mem.store.cache_get("s", key) == sound  # rendered again and stored whole
    assert mem.backend.view_pool._executor is not None  # the processes made the others
    mem.backend.close()
    mem.close()


def test_views_are_made_in_the_calling_thread_by_default_on_the_cpu(tmp_path, model):
    mem = _memory(tmp_path / "m.sqlite3", model)
    assert mem.backend.view_pool.processes == 0
    with pytest.raises(ValueError, match="view_processes"):
        DeepSeekOCRBackend(model, view_processes=-1)
    mem.close()


def test_local_queue_encodes_a_page_once_for_concurrent_callers_and_batches_by_tier():
    calls = []

    def encode(mode, payloads):
        calls.append((mode, list(payloads)))
        return [f"{mode}:{p}" for p in payloads]

    queue = LocalEncodeQueue(encode, batch=2)
    with queue.hold():
        first = queue.submit_many(
            [(PageJob("s", f"k{i}", i, mode), i) for i, mode in enumerate("ttst")]
        )
        again, queued = queue.submit(PageJob("s", "k0", 0, "t"), 0)
        assert not queued and again is first[0][0]
        other_session = queue.submit(PageJob("other", "k0", 0, "t"), 9)
        assert other_session[1]
        assert queue.depth == 5
    assert [f.result(timeout=30) for f, _ in first] == ["t:0", "t:1", "s:2", "t:3"]
    assert other_session[0].result(timeout=30) == "t:9"
    assert calls[0] == ("t", [0, 1])  # the oldest page's tier, at most `batch` pages
    assert sorted(len(p) for _, p in calls) == [1, 2, 2]
    assert queue.stats().deduplicated == 1


def test_a_failed_forward_pass_fails_its_pages_only():
    def encode(mode, payloads):
        if mode == "bad":
            raise RuntimeError("out of memory")
        return payloads

    queue = LocalEncodeQueue(encode, batch=4)
    with queue.hold():
        (bad, _), (good, _) = queue.submit_many(
            [(PageJob("s", "a", 3, "bad"), 1), (PageJob("s", "b", 4, "good"), 2)]
        )
    with pytest.raises(RuntimeError, match="page 3 of session 's'.*out of memory"):
        bad.result(timeout=30)
    assert good.result(timeout=30) == 2


def test_local_timeout_names_the_pages_and_the_timeout(tmp_path, model, conversation):
    mem = _memory(tmp_path / "m.sqlite3", model, encode_timeout_s=0.2)
    mem.extend("s", conversation(30))
    with mem.backend.encode_queue.hold(), pytest.raises(EncodeTimeoutError) as caught:
        mem.context("s", QUERY)
    message = str(caught.value)
    assert "page 0 of session 's'" in message and "0.2 s encode timeout" in message
    assert [p.index for p in caught.value.pages][:1] == [0]
    mem.backend.encode_timeout_s = 120
    assert mem.context("s", QUERY).encoded == len(caught.value.pages)  # released: it goes on
    mem.close()


# --------------------------------------------------------------------------- Redis workers
def _worker(url: str, prefix: str, checkpoint: Path, name: str, log: Path, *extra: str):
    return subprocess.Popen(
        [
            sys.executable, "-m", "optical_memory.apps.cli", "worker", "--store", url,
            "--prefix", prefix, "--model", str(checkpoint), "--device", "cpu", "--name", name,
            "--verbose", *extra,
        ],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )


def _pending(client, stream: str) -> dict[str, int]:
    try:
        summary = client.xpending(stream, GROUP)
    except redis.ResponseError:
        return {}
    return {c["name"].decode(): int(c["pending"]) for c in summary.get("consumers") or []}


def test_two_workers_one_killed_mid_batch_every_page_encoded_once_and_every_waiter_served(
    redis_servers, tmp_path, model, checkpoint, conversation
):
    server = redis_servers("--notify-keyspace-events", "K$")  # count every cache write
    prefix = "omq"
    store = RedisStore(server.url, prefix=prefix)
    mem = _memory(store, model, encoding="workers", encode_timeout_s=240)
    sessions = [f"chat-{i}" for i in range(4)]
    for n, sid in enumerate(sessions):
        mem.extend(sid, conversation(34, seed=10 + n))
    expected = {sid: _alone(mem, sid) for sid in sessions}
    wanted = sum(len(v) for v in expected.values())
    stream = stream_key(store, model.encoder.cache_id)

    writes: Counter[str] = Counter()
    listener = server.client().pubsub()
    listener.psubscribe(f"__keyspace@0__:{prefix}:*:c:*")
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            message = listener.get_message(timeout=0.2)
            if message and message["type"] == "pmessage" and message["data"] == b"set":
                writes[message["channel"].decode().rsplit(":c:", 1)[1]] += 1

    counting = threading.Thread(target=listen)
    counting.start()
    results, threads = _contexts(mem, sessions)
    client = store.client
    _until(lambda: mem.backend.encode_queue_depth == wanted, f"{wanted} pages in the stream")

    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    a = _worker(server.url, prefix, checkpoint, "worker-a", logs[0], "--batch", "3")
    try:
        while True:  # stop worker A while it holds a batch it has not finished, then kill it
            _until(lambda: _pending(client, stream).get("worker-a", 0) > 0, "worker A's batch")
            a.send_signal(signal.SIGSTOP)
            if _pending(client, stream).get("worker-a", 0) > 0:
                break
            a.send_signal(signal.SIGCONT)
        held = _pending(client, stream)["worker-a"]
        a.kill()
        a.wait(timeout=30)
        b = _worker(
            server.url, prefix, checkpoint, "worker-b", logs[1], "--batch", "4",
            "--claim-after", "0.5",
        )
        try:
            for t in threads:
                t.join(timeout=240)
        finally:
            b.terminate()
            b.wait(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
        stop.set()
        counting.join()
        listener.close()
    output = [log.read_text() for log in logs]
    assert held > 0
    assert "claimed" in output[1]  # worker B took over worker A's batch
    keys = set()
    for sid in sessions:
        context = results[sid]
        assert not isinstance(context, Exception), context
        got = [s for s in context.segments if isinstance(s, torch.Tensor)]
        assert len(got) == len(expected[sid])
        for a_tokens, b_tokens in zip(got, expected[sid]):
            torch.testing.assert_close(a_tokens, b_tokens, rtol=1e-5, atol=1e-5)
        plan = mem.plan(sid, QUERY)
        records = {r.index: r for r in mem.pages(sid)}
        from optical_memory.cache import cache_key

        sid_keys = {
            cache_key(p.content_hash, records[p.index].fingerprint, p.mode, model.encoder.cache_id)
            for p in plan.in_context()
        }
        assert store.cache_contains(sid, sid_keys) == sid_keys
        keys |= sid_keys
    embedding_writes = {k: n for k, n in writes.items() if k in keys}
    assert embedding_writes == dict.fromkeys(keys, 1)  # each page stored exactly once
    assert client.xlen(stream) == 0 and mem.backend.encode_queue_depth == 0
    mem.close()


@pytest.fixture
def queued(redis_prefix, redis_url, model, conversation) -> Iterator[OpticalMemory]:
    """A memory on Redis with encoding="workers" (0.3 s timeout) and session "s" of 30 turns."""
    mem = _memory(
        RedisStore(redis_url, prefix=redis_prefix), model, encoding="workers", encode_timeout_s=0.3
    )
    mem.extend("s", conversation(30))
    yield mem
    mem.close()


def test_workers_timeout_names_pages_and_says_no_worker_serves_the_stream(queued, redis_prefix):
    mem = queued
    with pytest.raises(
        EncodeTimeoutError,
        match=r"0\.3 s encode timeout: page 0 of session 's' \(tiny\).*no worker has ever read "
        rf"the stream .*--prefix {redis_prefix}",
    ) as caught:
        mem.context("s", QUERY)
    assert caught.value.pages
    assert mem.backend.encode_queue_depth == len(mem.plan("s", QUERY).in_context())
    with pytest.raises(EncodeTimeoutError):  # asked again: waits on the same entries
        mem.context("s", QUERY)
    assert mem.backend.encode_queue_depth == len(mem.plan("s", QUERY).in_context())


def test_sqlite_store_with_workers_is_refused(tmp_path, model, conversation):
    mem = _memory(tmp_path / "m.sqlite3", model, encoding="workers")
    mem.extend("s", conversation(30))
    with pytest.raises(ValueError, match="Redis store"):
        mem.context("s", QUERY)
    mem.close()


def test_hostile_stream_entries_are_dropped_and_sound_ones_done(queued, model):
    mem, store = queued, queued.store
    with pytest.raises(EncodeTimeoutError):  # queues the session's pages
        mem.context("s", QUERY)
    stream = stream_key(store, model.encoder.cache_id)
    sound = store.client.xlen(stream)
    good = {
        "v": "1", "sid": "s", "key": "a" * 40, "img": "b" * 40, "mode": "tiny", "w": "1280",
        "h": "1280", "idx": "0",
    }
    hostile = [
        {"v": "2"},
        {**good, "key": "../../etc"},
        {**good, "mode": "ultra"},
        {**good, "w": "99999"},
        {**good, "sid": "x" * 5000},
        {**good, "idx": "-1"},
        {**good, "sid": b"\xff\xfe"},
        {**good, "img": "c" * 40},  # sound, but no such image in the cache: a failure told
    ]
    for fields in hostile:
        store.client.xadd(stream, fields)
    for fields in hostile[:-1]:
        with pytest.raises(ValueError):
            parse_entry({k.encode(): v for k, v in fields.items()}, MODES)
    from optical_memory.apps.worker import PageEncoder

    worker = EncodeWorker(
        store, model.encoder.cache_id, PageEncoder(store, model.encoder), modes=MODES,
        batch=4, block_s=0.05, name="w",
    )
    stats = worker.run(idle_exit_s=0.2)
    assert stats.pages == sound and stats.failed == 1
    assert store.client.xlen(stream) == 0
    store.client.delete(stream)  # flushed under a running worker: it creates the group again
    assert worker.step() == 0
    assert [g["name"] for g in store.client.xinfo_groups(stream)] == [GROUP.encode()]
    assert mem.context("s", QUERY).encoded == 0  # the workers' results, read from the cache


def test_workers_serve_sessions_of_a_redis_cluster(
    redis_cluster, cluster_prefix, model, conversation
):
    from optical_memory.apps.worker import PageEncoder

    store = RedisStore(redis_cluster.url, prefix=cluster_prefix)
    mem = _memory(store, model, encoding="workers", encode_timeout_s=120)
    sessions = ["alpha", "beta", "{beta}"]  # spread over the cluster's slots
    for n, sid in enumerate(sessions):
        mem.extend(sid, conversation(30, seed=n))
    expected = {sid: _alone(mem, sid) for sid in sessions}
    pages = PageEncoder(store, model.encoder, view_processes=2)
    worker = EncodeWorker(  # pipelined: the next read prepared while a batch is encoded
        store, model.encoder.cache_id, pages, prepare=pages.prepare, modes=MODES, batch=2,
        block_s=0.05, name="w",
    )
    stop = threading.Event()
    working = threading.Thread(target=worker.run, args=(stop,))
    working.start()
    try:
        results, threads = _contexts(mem, sessions)
        for t in threads:
            t.join(timeout=120)
    finally:
        stop.set()
        working.join(timeout=60)
        pages.pool.close()
    for sid in sessions:
        got = [s for s in results[sid].segments if isinstance(s, torch.Tensor)]
        assert len(got) == len(expected[sid])
        for a_tokens, b_tokens in zip(got, expected[sid]):
            torch.testing.assert_close(a_tokens, b_tokens, rtol=1e-5, atol=1e-5)
    assert worker.stats.pages == sum(len(v) for v in expected.values())
    mem.close()


def test_worker_command_refuses_what_it_cannot_serve(checkpoint, tmp_path, monkeypatch):
    from optical_memory.apps.cli import main

    monkeypatch.delenv("OPTICAL_MEMORY_STORE", raising=False)
    monkeypatch.delenv("OPTICAL_MEMORY_MODEL", raising=False)
    cases = [
        ([], "give --store"),
        (["--store", str(tmp_path / "m.sqlite3")], "lives in a Redis store"),
        (["--store", "redis:127.0.0.1:6379"], "must be followed by '//'"),
        (["--store", "redis://127.0.0.1:6379/15", "--batch", "0"], "--batch must be at least 1"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            main(["worker", "--model", str(checkpoint), *argv])
    with pytest.raises(SystemExit, match="give --model"):
        main(["worker", "--store", "redis://127.0.0.1:6379/15"])


def test_encoding_defaults_to_the_environment(model, monkeypatch):
    monkeypatch.delenv("OPTICAL_MEMORY_ENCODING", raising=False)
    assert DeepSeekOCRBackend(model).encoding == "local"
    monkeypatch.setenv("OPTICAL_MEMORY_ENCODING", "workers")
    assert DeepSeekOCRBackend(model).encoding == "workers"
    assert DeepSeekOCRBackend(model, encoding="inline").encoding == "inline"
    monkeypatch.setenv("OPTICAL_MEMORY_ENCODING", "gpu")
    with pytest.raises(ValueError, match=r"workers, inline, got 'gpu'.*OPTICAL_MEMORY_ENCODING"):
        DeepSeekOCRBackend(model)


def test_inline_encoding_uses_no_queue(tmp_path, model, conversation):
    mem = _memory(tmp_path / "m.sqlite3", model, encoding="inline")
    mem.extend("s", conversation(30))
    context = mem.context("s", QUERY)
    got = [s for s in context.segments if isinstance(s, torch.Tensor)]
    assert context.encoded == len(got) > 0
    assert mem.backend._local_queue is None and mem.backend.encode_queue_depth == 0
    for a_tokens, b_tokens in zip(got, _alone(mem, "s")):
        torch.testing.assert_close(a_tokens, b_tokens, rtol=1e-5, atol=1e-5)
    mem.close()


def test_a_forward_pass_hands_each_caller_its_pages_in_one_call():
    stored = []

    def mine(jobs, results):
        stored.append(("mine", [j.key for j in jobs], results))

    def theirs(jobs, results):
        stored.append(("theirs", [j.key for j in jobs], results))

    queue = LocalEncodeQueue(lambda mode, payloads: [p * 10 for p in payloads], batch=8)
    with queue.hold():
        futures = [f for f, _ in queue.submit_many(
            [(PageJob("a", "k1", 1, "t"), 1), (PageJob("a", "k2", 2, "t"), 2)], mine
        )]
        futures += [f for f, _ in queue.submit_many([(PageJob("b", "k3", 3, "t"), 3)], theirs)]
    assert [f.result(timeout=30) for f in futures] == [10, 20, 30]
    assert sorted(stored) == [("mine", ["k1", "k2"], [10, 20]), ("theirs", ["k3"], [30])]
    assert queue.stats().batches == 1
