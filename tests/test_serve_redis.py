"""Two `optical-memory serve` processes sharing one Redis store, as replicas behind a load
balancer: a conversation moves between them, concurrent clients of one session spread over
both lose and double nothing, an Idempotency-Key holds across replicas, and a restarted
replica goes on with the memory it had. Their logs are JSON lines without message content."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from optical_memory.apps.server import hash_key, session_hash
from optical_memory.testing import OpenAITestServer

REPLY = "Noted, across replicas."
KEY = "replica-key"
MODEL = "optical-memory"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """One `optical-memory serve` process; its stderr (the JSON log) goes to a file."""

    def __init__(self, store: str, model: str, log_path) -> None:
        self.store, self.model, self.log_path = store, model, log_path
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Replica:
        return self.launch().ready()

    def launch(self) -> Replica:
        env = {**os.environ, "OPTICAL_MEMORY_API_KEYS": f"acme:{hash_key(KEY)}"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "optical_memory", "serve", "--store", self.store,
                 "--model", self.model, "--port", str(self.port)],
                stdout=subprocess.DEVNULL, stderr=log, env=env,
            )
        return self

    def ready(self) -> Replica:
        deadline = time.monotonic() + 60  # a start-up deadline, not a measurement
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"serve did not get ready: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def replicas(redis_servers, tmp_path):
    redis = redis_servers()
    upstream = OpenAITestServer(reply=REPLY).start()
    model = f"openai:{upstream.base_url}?model=test-model&profile=qwen2.5-vl&window=4096"
    pair = [Replica(redis.url, model, tmp_path / f"serve-{i}.log") for i in range(2)]
    try:
        for replica in pair:  # both start at once
            replica.launch()
        for replica in pair:
            replica.ready()
        yield pair
    finally:
        for replica in pair:
            replica.stop()
        upstream.stop()


def test_two_replicas_share_one_redis_store(replicas):
    a, b = replicas
    ca, cb = a.client(), b.client()

    def turns(session: str, replica: Replica = a) -> list[str]:
        r = httpx.get(f"{replica.url}/v1/sessions/{session}/turns",
                      headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text
        return [t["message"]["content"] for t in r.json()["data"]]

    # a conversation that moves between the replicas (the client sends its whole history)
    first = ca.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Launch is March 3rd."}], user="moving"
    )
    history = [{"role": "user", "content": "Launch is March 3rd."},
               {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "When is launch?"}]
    second = cb.chat.completions.create(model=MODEL, messages=history, user="moving")
    assert second.model_extra["optical_memory"]["appended"] == 0
    assert turns("moving", b) == ["Launch is March 3rd.", REPLY, "When is launch?", REPLY]

    # 10 clients on one session, each alternating between the replicas
    def client_run(i: int) -> None:
        for j in range(3):
            (ca, cb)[(i + j) % 2].chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"c{i}.{j}"}], user="busy"
            )

    with ThreadPoolExecutor(10) as pool:
        for job in [pool.submit(client_run, i) for i in range(10)]:
            job.result()
    stored = turns("busy")
    assert len(stored) == 60 and stored[1::2] == [REPLY] * 30
    questions = stored[::2]
    assert sorted(questions) == sorted(f"c{i}.{j}" for i in range(10) for j in range(3))
    for i in range(10):
        assert [q for q in questions if q.startswith(f"c{i}.")] == [f"c{i}.{j}" for j in range(3)]

    # an Idempotency-Key holds across replicas
    for replica in (a, b, a):
        r = httpx.post(
            f"{replica.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}", "Idempotency-Key": "retry-1"},
            json={"model": MODEL, "user": "idem", "messages": [{"role": "user", "content": "Q"}]},
        )
        assert r.status_code == 200, r.text
    assert turns("idem", b) == ["Q", REPLY]

    # a restarted replica goes on with the memory it had
    assert a.stop() == 0  # SIGTERM: a clean shutdown
    a.start()
    again = a.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Still there?"}], user="moving"
    )
    assert again.usage.model_extra["optical_memory"]["turns"] == 4
    assert len(turns("moving", b)) == 6
    sessions = httpx.get(f"{b.url}/v1/sessions", headers={"Authorization": f"Bearer {KEY}"})
    assert {s["id"] for s in sessions.json()["data"]} == {"moving", "busy", "idem"}

    # the logs: JSON lines with request ids and hashed session ids, no message content
    a.stop()
    b.stop()
    lines = [json.loads(line) for r in (a, b)
             for line in r.log_path.read_text().splitlines() if line.strip()]
    requests = [x for x in lines if x.get("msg") == "request" and x["route"] == "chat_completions"]
    assert len(requests) == 2 + 30 + 3 + 1
    assert all(x["request_id"] and x["status"] == 200 and x["ms"] > 0 for x in requests)
    assert {x["session"] for x in requests} == {
        session_hash(f"acme/{s}") for s in ("moving", "busy", "idem")
    }
    text = "\n".join(r.log_path.read_text() for r in (a, b))
    for secret in ("March 3rd", "Still there", "c3.1", '"moving"'):
        assert secret not in text


def test_one_redis_store_shared_by_many_threads_sees_no_false_data_loss(redis_servers):
    """The server's worker threads share one RedisStore: a connection opened while another
    thread writes reads the store's marker older than that write, which is no data loss."""
    import threading
    import uuid

    from optical_memory.stores import NewTurn
    from optical_memory.stores.redis import RedisStore

    redis = redis_servers()
    errors: list[BaseException] = []
    for _ in range(3):  # a fresh store each time: the marker is created under the race too
        store = RedisStore(redis.url, prefix=f"threads-{uuid.uuid4().hex[:8]}")
        start = threading.Barrier(32)

        def run(i: int, store: RedisStore = store, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                for j in range(10):
                    body = json.dumps({"role": "user", "content": f"m{j}"}, separators=(",", ":"))
                    store.append(f"s{i}", [NewTurn(f"t{j}", "user", f"m{j}", body)])
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert all(store.turn_count(f"s{i}") == 10 for i in range(32))
        store.close()
