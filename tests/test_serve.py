"""`optical-memory serve`: the real server (uvicorn on a free loopback port) driven by the official
`openai` client (sync, async, streaming) and httpx; tenants, every bad request, concurrency,
metrics, logs. The model behind it is `OpenAIBackend` pointed at `OpenAITestServer`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from optical_memory.apps.server import (
    BackgroundServer,
    JsonFormatter,
    create_app,
    hash_key,
    load_keys,
    session_hash,
)
from optical_memory.backends import OpenAIBackend
from optical_memory.memory import OpticalMemory
from optical_memory.testing import OpenAITestServer

REPLY = "The launch is on March 3rd."
KEYS = {"acme": "key-acme-1", "globex": "key-globex-1"}
MAX_BODY = 256 * 1024
MODEL = "optical-memory"


@pytest.fixture(scope="module")
def upstream():
    with OpenAITestServer(reply=REPLY) as server:
        yield server


@pytest.fixture(scope="module")
def served(upstream, tmp_path_factory):
    backend = OpenAIBackend(upstream.base_url, "test-model", profile="qwen2.5-vl", window=4096,
                            max_retries=0, timeout=30)
    memory = OpticalMemory(tmp_path_factory.mktemp("serve") / "memory.sqlite3", model=backend)
    app = create_app(memory, keys={hash_key(k): t for t, k in KEYS.items()}, max_body=MAX_BODY)
    with BackgroundServer(app) as server:
        server.memory = memory
        server.app = app
        yield server
    memory.close()


def client(served, tenant: str = "acme", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=KEYS[tenant], max_retries=0, **kw)


def http(served, tenant: str | None = "acme") -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    return httpx.Client(base_url=served.url, headers=headers, timeout=30)


def turns(served, session: str, tenant: str = "acme") -> list[dict]:
    with http(served, tenant) as h:
        r = h.get(f"/v1/sessions/{session}/turns")
        assert r.status_code == 200, r.text
        return [t["message"] for t in r.json()["data"]]


def assert_error(response: httpx.Response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in error["message"] or needle == error["param"], (needle, error)
    return error


# --------------------------------------------------------------------------- chat
def test_sync_client_chats_whole_history_or_only_the_new_message(served):
    c = client(served)
    first = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "When do we launch?"}], user="sync"
    )
    assert first.choices[0].message.content == REPLY
    assert first.choices[0].finish_reason == "stop"
    # the whole history: the stored prefix is recognised, only the new question goes in
    history = [
        {"role": "user", "content": "When do we launch?"},
        {"role": "assistant", "content": REPLY},
        {"role": "user", "content": "Are you sure?"},
    ]
    second = c.chat.completions.create(
        model=MODEL, messages=history, extra_headers={"X-Session-Id": "sync"}
    )
    assert second.model_extra["optical_memory"]["appended"] == 0
    # only the new message, by the header this time
    third = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Thanks."}],
        extra_headers={"X-Session-Id": "sync"},
    )
    assert third.choices[0].message.content == REPLY
    assert [m["content"] for m in turns(served, "sync")] == [
        "When do we launch?", REPLY, "Are you sure?", REPLY, "Thanks.", REPLY
    ]
    # new messages in a whole history (a tool round, say) are appended before the question
    history += [
        {"role": "assistant", "content": REPLY},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": REPLY},
        {"role": "user", "content": "Note: budget is 5k."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "And the budget?"},
    ]
    fourth = c.chat.completions.create(model=MODEL, messages=history, user="sync")
    assert fourth.model_extra["optical_memory"]["appended"] == 2
    assert [m["content"] for m in turns(served, "sync")][6:] == [
        "Note: budget is 5k.", "Noted.", "And the budget?", REPLY
    ]


def test_usage_splits_positions_and_compares_with_plain_text(served, upstream, conversation):
    with http(served) as h:
        r = h.post("/v1/sessions/long/turns", json={"messages": conversation(240)})
        assert r.status_code == 201, r.text
        assert len(r.json()["data"]) == 240
    answer = client(served).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What was the budget?"}], user="long",
        max_tokens=64,
    )
    usage = answer.usage
    details = usage.prompt_tokens_details.model_extra
    memory = usage.model_extra["optical_memory"]
    assert details["vision_positions"] > 0 and details["text_positions"] > 0
    assert details["text_positions"] + details["vision_positions"] == usage.prompt_tokens
    assert memory["plain_text_tokens"] > usage.prompt_tokens  # the pages save positions
    assert memory["positions_saved"] == memory["plain_text_tokens"] - usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    sent = upstream.requests[-1]
    assert sent["max_tokens"] == 64
    parts = [p for m in sent["messages"] if isinstance(m["content"], list) for p in m["content"]]
    assert any(p["type"] == "image_url" for p in parts)  # the old turns went as page images
    assert sent["messages"][-1] == {"role": "user", "content": "What was the budget?"}


def test_streaming_sync_and_async_clients(served):
    c = client(served)
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Stream it."}], user="stream",
        stream=True, stream_options={"include_usage": True},
    ))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0
    assert len({ch.id for ch in chunks}) == 1

    async def chat() -> tuple[str, str, object]:
        a = openai.AsyncOpenAI(base_url=served.base_url, api_key=KEYS["acme"], max_retries=0)
        plain = await a.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Async."}], user="stream"
        )
        stream = await a.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Async stream."}],
            user="stream", stream=True,
        )
        pieces, last = [], None
        async for ch in stream:
            last = ch
            pieces += [ch.choices[0].delta.content or ""] if ch.choices else []
        await a.close()
        return plain.choices[0].message.content, "".join(pieces), last

    plain, streamed, last = asyncio.run(chat())
    assert plain == streamed == REPLY
    # no usage chunk unless include_usage (as OpenAI); the last chunk carries the usage then
    assert last.choices[0].finish_reason == "stop" and last.usage.prompt_tokens > 0
    assert [m["content"] for m in turns(served, "stream")] == [
        "Stream it.", REPLY, "Async.", REPLY, "Async stream.", REPLY
    ]


def test_contradicting_history_is_a_409_naming_the_first_differing_message(served):
    c = client(served)
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A"}], user="c")
    with pytest.raises(openai.ConflictError) as info:
        c.chat.completions.create(
            model=MODEL, user="c",
            messages=[{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                      {"role": "user", "content": "C"}],
        )
    error = info.value.body
    assert error["param"] == "messages[1]" and "messages[1]" in error["message"]
    assert error["code"] == "history_conflict"
    assert [m["content"] for m in turns(served, "c")] == ["A", REPLY]  # nothing stored


def test_idempotency_key_appends_the_answer_once(served):
    body = {"model": MODEL, "user": "idem", "messages": [{"role": "user", "content": "Once?"}]}
    with http(served) as h:
        first = h.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "req-1"})
        again = h.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": "req-1"})
        assert first.status_code == again.status_code == 200
        assert again.json()["choices"][0]["message"]["content"] == REPLY
        streamed = h.post("/v1/chat/completions", json={**body, "stream": True},
                          headers={"Idempotency-Key": "req-1"})
        assert REPLY.split()[0] in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
        assert len(turns(served, "idem")) == 2
        # a whole-history retry with the key is recognised too
        whole = {**body, "messages": [{"role": "user", "content": "Once?"},
                                      {"role": "assistant", "content": REPLY},
                                      {"role": "user", "content": "Twice?"}]}
        for _ in range(2):
            r = h.post("/v1/chat/completions", json=whole, headers={"Idempotency-Key": "req-2"})
            assert r.status_code == 200, r.text
        assert [m["content"] for m in turns(served, "idem")] == ["Once?", REPLY, "Twice?", REPLY]
        other = h.post("/v1/chat/completions",
                       json={**body, "messages": [{"role": "user", "content": "Other?"}]},
                       headers={"Idempotency-Key": "req-1"})
        assert_error(other, 409, "Idempotency-Key")


# --------------------------------------------------------------------------- REST
def test_rest_sessions_turns_plan_pages_export_import_delete(served, conversation):
    messages = conversation(200)
    with http(served) as h:
        r = h.post("/v1/sessions/rest/turns", json=messages[:100])
        assert r.status_code == 201
        r = h.post("/v1/sessions/rest/turns", json={**messages[100], "turn_id": "t100"})
        assert r.json()["data"] == [{"index": 100, "turn_id": "t100"}]
        r = h.post("/v1/sessions/rest/turns", json={"messages": messages[101:]})
        assert [t["index"] for t in r.json()["data"]] == list(range(101, 200))
        stored = h.get("/v1/sessions/rest/turns").json()["data"]
        assert [t["message"] for t in stored] == messages
        window = h.get("/v1/sessions/rest/turns", params={"start": 10, "stop": 12}).json()
        assert [t["index"] for t in window["data"]] == [10, 11]
        assert {"id": "rest", "object": "session"} in h.get("/v1/sessions").json()["data"]

        plan = h.get("/v1/sessions/rest/plan", params={"query": "budget?"}).json()
        assert plan["session_id"] == "rest" and plan["query_tokens"] > 0
        page = next(p for p in plan["pages"] if p["mode"])
        tier = page["mode"]
        png = h.get(f"/v1/sessions/rest/pages/{page['index']}.png", params={"tier": tier})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
        width = int.from_bytes(png.content[16:20], "big")
        assert width == served.memory.tiers[tier].width
        thumb = h.get(f"/v1/sessions/rest/pages/{page['index']}.png", params={"width": 100})
        assert int.from_bytes(thumb.content[16:20], "big") == 100

        exported = h.get("/v1/sessions/rest/export")
        assert exported.headers["content-type"].startswith("application/x-ndjson")
        assert len(exported.text.splitlines()) == 200
        r = h.post("/v1/sessions/rest-copy/import", content=exported.content)
        assert r.status_code == 201 and len(r.json()["data"]) == 200
        r = h.post("/v1/sessions/rest-copy/import", content=exported.content)  # idempotent
        assert len(turns(served, "rest-copy")) == 200
        assert h.get("/v1/sessions/rest-copy/export").content == exported.content
        stats = h.get("/v1/sessions/rest/stats").json()
        assert stats["turns"] == 200 and stats["session_id"] == "rest"

        assert h.delete("/v1/sessions/rest-copy").json()["deleted"] is True
        assert_error(h.get("/v1/sessions/rest-copy/turns"), 404, "rest-copy")
        assert_error(h.delete("/v1/sessions/rest-copy"), 404, "rest-copy")


def test_tenants_see_only_their_own_sessions(served):
    acme, globex = client(served, "acme"), client(served, "globex")
    acme.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "acme secret"}], user="shared-id"
    )
    with http(served, "globex") as h:
        assert "shared-id" not in {s["id"] for s in h.get("/v1/sessions").json()["data"]}
        for method, path in [
            ("GET", "/v1/sessions/shared-id/turns"),
            ("GET", "/v1/sessions/shared-id/plan"),
            ("GET", "/v1/sessions/shared-id/pages/0.png"),
            ("GET", "/v1/sessions/shared-id/export"),
            ("GET", "/v1/sessions/shared-id/stats"),
            ("DELETE", "/v1/sessions/shared-id"),
            ("GET", "/ui/sessions/shared-id"),
        ]:
            assert_error(h.request(method, path), 404, "shared-id")  # never 403
    # the same id is another session for globex
    globex.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "globex"}], user="shared-id"
    )
    assert [m["content"] for m in turns(served, "shared-id", "globex")] == ["globex", REPLY]
    assert [m["content"] for m in turns(served, "shared-id", "acme")] == ["acme secret", REPLY]
    # in the store the ids are namespaced by tenant
    assert {"acme/shared-id", "globex/shared-id"} <= set(served.memory.sessions())


BAD = [
    # (name, method, path, headers, body (json or bytes), status, needles)
    ("no key", "POST", "/v1/chat/completions", {"Authorization": ""}, {}, 401, ["no API key"]),
    ("wrong key", "GET", "/v1/sessions", {"Authorization": "Bearer nope"}, None, 401,
     ["invalid API key"]),
    ("basic auth", "GET", "/v1/models", {"Authorization": "Basic eDp5"}, None, 401,
     ["no API key"]),
    ("no session", "POST", "/v1/chat/completions", {},
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400,
     ["X-Session-Id", "'user'"]),
    ("not json", "POST", "/v1/chat/completions", {"X-Session-Id": "b"}, b"{nope", 400,
     ["not valid JSON"]),
    ("not utf-8", "POST", "/v1/chat/completions", {"X-Session-Id": "b"}, b'{"a":"\xff"}', 400,
     ["not UTF-8"]),
    ("deep nesting", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     b"[" * 100_000 + b"]" * 100_000, 400, ["nested too deeply"]),
    ("NaN", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     b'{"model": "optical-memory", "temperature": NaN, "messages": []}', 400, ["NaN"]),
    ("array body", "POST", "/v1/chat/completions", {"X-Session-Id": "b"}, [1], 400,
     ["JSON object"]),
    ("no model", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"messages": [{"role": "user", "content": "hi"}]}, 400, ["model"]),
    ("unknown model", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, ["gpt-9"]),
    ("no messages", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "messages": []}, 400, ["messages"]),
    ("bad role", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400,
     ["messages[0]", "robot"]),
    ("message not object", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "messages": [{"role": "user", "content": "a"}, 7,
                                   {"role": "user", "content": "b"}]}, 400, ["messages[1]"]),
    ("last not user", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400,
     ["messages[0]", "'user'"]),
    ("empty question", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "messages": [{"role": "user", "content": " "}]}, 400, ["empty"]),
    ("image question", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, 400,
     ["must be text"]),
    ("n=2", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "n": 2, "messages": [{"role": "user", "content": "hi"}]}, 400, ["n must"]),
    ("max_tokens 0", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 400,
     ["max_tokens"]),
    ("stream not bool", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "stream": "yes", "messages": [{"role": "user", "content": "hi"}]}, 400,
     ["stream"]),
    ("stream_options alone", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "stream_options": {"include_usage": True},
      "messages": [{"role": "user", "content": "hi"}]}, 400, ["stream_options"]),
    ("temperature 9", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "temperature": 9, "messages": [{"role": "user", "content": "hi"}]}, 400,
     ["temperature"]),
    ("session id too long", "POST", "/v1/chat/completions", {"X-Session-Id": "s" * 300},
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, ["session id"]),
    ("session id control char", "POST", "/v1/chat/completions", {},
     {"model": MODEL, "user": "a\u0007b", "messages": [{"role": "user", "content": "hi"}]}, 400,
     ["control character"]),
    ("bad idempotency key", "POST", "/v1/chat/completions",
     {"X-Session-Id": "b", "Idempotency-Key": "k" * 300},
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400,
     ["Idempotency-Key"]),
    ("body too large", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}, 413,
     ["over the limit"]),
    ("import too large", "POST", "/v1/sessions/b/import", {}, b"x" * (MAX_BODY + 1), 413,
     ["over the limit"]),
    ("import not jsonl", "POST", "/v1/sessions/b/import", {}, b'{"role": "user", "content": "a"}\nnope\n', 400,
     ["line 2"]),
    ("import empty", "POST", "/v1/sessions/b/import", {}, b"\n\n", 400, ["no messages"]),
    ("turns bad message", "POST", "/v1/sessions/b/turns", {},
     [{"role": "user", "content": "ok"}, {"role": "x", "content": "no"}], 400, ["message 1"]),
    ("turns empty", "POST", "/v1/sessions/b/turns", {}, [], 400, ["not empty"]),
    ("turns of unknown session", "GET", "/v1/sessions/nobody/turns", {}, None, 404, ["nobody"]),
    ("plan of unknown session", "GET", "/v1/sessions/nobody/plan", {}, None, 404, ["nobody"]),
    ("bad start", "GET", "/v1/sessions/known/turns?start=-1", {}, None, 400, ["start"]),
    ("start past 64 bits", "GET", "/v1/sessions/known/turns?stop=99999999999999999999999", {},
     None, 400, ["stop must be 0 to"]),
    ("max_tokens past 32 bits", "POST", "/v1/chat/completions", {"X-Session-Id": "b"},
     {"model": MODEL, "max_tokens": 10**30, "messages": [{"role": "user", "content": "hi"}]},
     400, ["max_tokens"]),
    ("start not int", "GET", "/v1/sessions/known/turns?start=x", {}, None, 400, ["start"]),
    ("no such page", "GET", "/v1/sessions/known/pages/99.png", {}, None, 404, ["no page 99"]),
    ("bad tier", "GET", "/v1/sessions/known/pages/0.png?tier=huge", {}, None, 400,
     ["unknown tier"]),
    ("bad width", "GET", "/v1/sessions/known/pages/0.png?width=99999", {}, None, 400,
     ["width"]),
    ("unknown route", "GET", "/v1/nothing", {}, None, 404, ["no route"]),
    ("wrong method", "PUT", "/v1/chat/completions", {}, None, 405, ["not allowed"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_every_bad_request_is_an_openai_style_error_naming_the_problem(served, case):
    _name, method, path, headers, body, status, needles = case
    with http(served) as h:
        if "known" in path and not any(s["id"] == "known" for s in
                                       h.get("/v1/sessions").json()["data"]):
            h.post("/v1/sessions/known/turns", json=[{"role": "user", "content": "hi"}])
        before = set(served.memory.sessions())
        kwargs = {"content": body} if isinstance(body, bytes) else (
            {"json": body} if body is not None else {})
        headers = {k: v for k, v in headers.items()}
        if headers.get("Authorization") == "":
            h.headers.pop("Authorization")
            headers.pop("Authorization")
        r = h.request(method, path, headers=headers, **kwargs)
        assert_error(r, status, *needles)
        assert r.headers["x-request-id"]
        assert set(served.memory.sessions()) == before  # nothing stored


def test_a_body_without_content_length_is_cut_at_the_limit(served):
    def chunks():
        for _ in range(MAX_BODY // 4096 + 2):
            yield b" " * 4096

    with http(served) as h:
        r = h.post("/v1/chat/completions", content=chunks(), headers={"X-Session-Id": "b"})
    assert_error(r, 413, "over the limit")


# --------------------------------------------------------------------------- concurrency
def test_50_clients_on_50_sessions_and_10_on_one_session(served):
    rounds = 2

    def whole_history(i: int) -> None:
        c = client(served)
        history = []
        for j in range(rounds):
            history.append({"role": "user", "content": f"client {i} round {j}"})
            r = c.chat.completions.create(model=MODEL, messages=history, user=f"many-{i}")
            history.append({"role": "assistant", "content": r.choices[0].message.content})

    def only_new(i: int) -> None:
        c = client(served)
        for j in range(rounds):
            c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"one {i}.{j}"}], user="one"
            )

    with ThreadPoolExecutor(60) as pool:
        jobs = [pool.submit(whole_history, i) for i in range(50)]
        jobs += [pool.submit(only_new, i) for i in range(10)]
        for job in jobs:
            job.result()
    for i in range(50):
        expected = [x for j in range(rounds) for x in (f"client {i} round {j}", REPLY)]
        assert [m["content"] for m in turns(served, f"many-{i}")] == expected
    shared = [m["content"] for m in turns(served, "one")]
    assert len(shared) == 10 * rounds * 2
    for k in range(0, len(shared), 2):  # every question is followed by its answer
        assert shared[k].startswith("one ") and shared[k + 1] == REPLY
    questions = shared[::2]
    assert sorted(questions) == sorted(f"one {i}.{j}" for i in range(10) for j in range(rounds))
    for i in range(10):  # each client's order kept
        mine = [q for q in questions if q.startswith(f"one {i}.")]
        assert mine == [f"one {i}.{j}" for j in range(rounds)]


def test_the_same_new_history_sent_at_once_is_stored_once(served):
    c = client(served)
    first = [{"role": "user", "content": "Plan the offsite."}]
    answer = c.chat.completions.create(model=MODEL, messages=first, user="dup")
    history = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "Budget is 4000 EUR."},
        {"role": "assistant", "content": "Noted: 4000 EUR."},
    ]

    def ask(i: int) -> None:
        messages = [*history, {"role": "user", "content": f"question {i}"}]
        client(served).chat.completions.create(model=MODEL, messages=messages, user="dup")

    with ThreadPoolExecutor(8) as pool:
        for job in [pool.submit(ask, i) for i in range(8)]:
            job.result()
    stored = [m["content"] for m in turns(served, "dup")]
    assert stored[:4] == [m["content"] for m in history]  # the new history once, in order
    assert stored.count("Budget is 4000 EUR.") == 1 and len(stored) == 4 + 8 * 2
    assert sorted(stored[4::2]) == sorted(f"question {i}" for i in range(8))


# --------------------------------------------------------------------------- operations
def test_health_readiness_models_and_metrics(served):
    with http(served, None) as h:
        assert h.get("/healthz").json() == {"status": "ok"}
        ready = h.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert_error(h.get("/v1/models"), 401, "no API key")
    with http(served) as h:
        models = h.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [MODEL, "test-model"]
    listed = [m.id for m in client(served).models.list()]
    assert listed == [MODEL, "test-model"]
    client(served).chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "metrics"}], user="metrics"
    )
    with http(served, None) as h:
        text = h.get("/metrics").text
    for needle in (
        'optical_memory_request_seconds_bucket{le="0.005",method="POST",route="chat_completions"}',
        'optical_memory_requests_total{method="POST",route="chat_completions",status="200"}',
        'optical_memory_tokens_total{direction="in"}',
        'optical_memory_tokens_total{direction="out"}',
        'optical_memory_prompt_positions_total{kind="vision"}',
        "optical_memory_plain_text_tokens_total",
        "optical_memory_positions_saved_total",
        'optical_memory_cache_lookups_total{result="hit"}',
        "optical_memory_cache_hit_ratio",
        "optical_memory_encode_queue_depth 0.0",
    ):
        assert needle in text, needle


def test_request_logs_are_json_with_a_request_id_and_no_content(served, caplog):
    caplog.set_level(logging.INFO, logger="optical_memory.serve")
    with http(served) as h:
        r = h.post(
            "/v1/chat/completions", headers={"X-Session-Id": "logged", "X-Request-Id": "rid-42"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "SECRET-WORDS"}]},
        )
    assert r.status_code == 200 and r.headers["x-request-id"] == "rid-42"
    records = [rec for rec in caplog.records if getattr(rec, "fields", {}).get("request_id")
               == "rid-42"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["route"] == "chat_completions" and line["status"] == 200
    assert line["session"] == session_hash("acme/logged") and line["tenant"] == "acme"
    assert line["ms"] > 0 and "prepare_ms" in line and "answer_ms" in line
    dump = json.dumps(line)
    assert "SECRET-WORDS" not in dump and "logged" not in dump


def test_upstream_failure_is_a_502_and_stores_nothing(tmp_path):
    with OpenAITestServer(status=500) as broken:
        backend = OpenAIBackend(broken.base_url, "test-model", max_retries=0)
        memory = OpticalMemory(tmp_path / "m.sqlite3", model=backend)
        app = create_app(memory)  # no keys: an open server
        with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as h:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            r = h.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "x"})
            assert_error(r, 502, "HTTP 500")
            r = h.post("/v1/chat/completions", json={**body, "stream": True},
                       headers={"X-Session-Id": "x"})
            assert_error(r, 502, "HTTP 500")
            assert h.get("/v1/sessions").json()["data"] == []
        bare = OpticalMemory(tmp_path / "none.sqlite3")  # no --model: 503, and not ready
        with BackgroundServer(create_app(bare)) as server, httpx.Client(base_url=server.url) as h:
            r = h.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "x"})
            assert_error(r, 503, "no model")
            assert h.get("/readyz").json()["problems"]["model"].startswith("no model")
        bare.close()
        memory.close()


# --------------------------------------------------------------------------- keys and packaging
def test_keys_file_holds_hashes_and_the_cli_makes_keys(tmp_path):
    keys = tmp_path / "keys"
    out = subprocess.run(
        [sys.executable, "-m", "optical_memory", "serve", "--keys", str(keys), "--add-key",
         "acme"], capture_output=True, text=True, check=True,
    )
    key = out.stdout.strip()
    assert key.startswith("om-") and key not in keys.read_text()
    assert load_keys(keys, env={}) == {hash_key(key): "acme"}
    env = {"OPTICAL_MEMORY_API_KEYS": f"globex:{hash_key('k2')},initech:sha256:{hash_key('k3')}"}
    assert load_keys(keys, env=env) == {
        hash_key(key): "acme", hash_key("k2"): "globex", hash_key("k3"): "initech"
    }
    keys.write_text("acme not-a-hash\n")
    with pytest.raises(ValueError, match="line 1"):
        load_keys(keys, env={})
    bad = subprocess.run(
        [sys.executable, "-m", "optical_memory", "serve", "--keys", str(keys)],
        capture_output=True, text=True, check=False,
    )
    assert bad.returncode == 1 and "line 1" in bad.stderr


def test_the_core_and_the_cli_import_without_the_serve_libraries(tmp_path):
    code = """
import importlib.abc, sys
BLOCKED = ("starlette", "uvicorn", "prometheus_client")
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
import optical_memory, optical_memory.memory, optical_memory.apps.cli
from optical_memory.apps.cli import main
try:
    main(["serve"])
except SystemExit as exc:
    print(exc.code)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'optical-memory[serve]'" in out.stdout


def test_a_local_checkpoint_answers_through_the_server(checkpoint, tmp_path):
    memory = OpticalMemory(tmp_path / "m.sqlite3", model=checkpoint, device="cpu")
    with BackgroundServer(create_app(memory)) as server:
        c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        r = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello there"}], user="local",
            max_tokens=4,
        )
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 4
        stream = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Again"}], user="local",
            max_tokens=4, stream=True,
        )
        list(stream)
        assert len(memory.turns("local")) == 4
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["status"] == "ready"
    memory.close()


def test_threads_share_one_memory_safely_under_mixed_load(served):
    """Chat, REST reads and viewer pages at once on one session: every answer is stored."""
    errors = []

    def chat(i: int) -> None:
        try:
            client(served).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"mixed {i}"}], user="mixed"
            )
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def read() -> None:
        with http(served) as h:
            for _ in range(3):
                for path in ("/v1/sessions/mixed/plan", "/v1/sessions/mixed/turns"):
                    r = h.get(path)
                    if r.status_code not in (200, 404):
                        errors.append(r.text)

    chat(-1)
    threads = [threading.Thread(target=chat, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(turns(served, "mixed")) == 18


def test_ask_and_stream_open_a_new_session_and_stream_returns_the_answer(upstream, tmp_path):
    backend = OpenAIBackend(upstream.base_url, "test-model", max_retries=0)
    with OpticalMemory(tmp_path / "m.sqlite3", model=backend) as memory:
        answer = memory.ask("fresh", "First question?")  # no turns before it
        assert answer.text == REPLY and answer.plan is not None and answer.plan.turns == 0
        generator = memory.stream("fresh-2", "Streamed first?")
        pieces = []
        while True:
            try:
                pieces.append(next(generator))
            except StopIteration as stop:
                streamed = stop.value
                break
        assert "".join(pieces) == streamed.text == REPLY
        assert streamed.answer_id and streamed.positions["query"] > 0
        assert [t.content for t in memory.turns("fresh-2")] == ["Streamed first?", REPLY]
        with pytest.raises(LookupError, match="unknown session"):
            memory.plan("never")  # plans of unknown sessions are still errors


def test_the_readme_client_example_runs_as_written(served, capsys):
    """The README's Serve example with its base URL and key pointed at the test server."""
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = section.split("\n## Serve: ", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'base_url="http://127.0.0.1:8000/v1"' in code and 'api_key="om-..."' in code
    code = code.replace("http://127.0.0.1:8000/v1", served.base_url)
    code = code.replace("om-...", KEYS["acme"]).replace("chat-42", "readme-example")
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the project's own README)
    vision, plain = capsys.readouterr().out.split()
    assert int(vision) >= 0 and int(plain) > 0
    assert [m["content"] for m in turns(served, "readme-example")] == [
        "Our launch date is March 3rd.", REPLY, "When do we launch?", REPLY
    ]


def test_debug_logging_alone_shows_message_content(upstream, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="optical_memory.serve")
    backend = OpenAIBackend(upstream.base_url, "test-model", max_retries=0)
    body = {"model": MODEL, "user": "dbg", "messages": [{"role": "user", "content": "VISIBLE"}]}
    with OpticalMemory(tmp_path / "m.sqlite3", model=backend) as memory:
        for debug in (False, True):
            caplog.clear()
            with BackgroundServer(create_app(memory, debug=debug)) as server:
                assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 200
            dump = "\n".join(JsonFormatter().format(r) for r in caplog.records)
            assert ("VISIBLE" in dump) is debug


def test_the_metrics_cache_counts_lookups_made_in_bulk(tmp_path):
    import torch

    from optical_memory.apps.server import CountingCache, Metrics
    from optical_memory.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "m.sqlite3")
    metrics = Metrics()
    cache = CountingCache(store, metrics)
    cache.put_tensors("s", [("a", torch.zeros(2, 3))])
    assert set(cache.get_tensors("s", {"a": (2, 3), "b": (2, 3)})) == {"a"}
    store.cache_put("s", "png", b"x")
    assert set(cache.get_entries("s", ["png", "none"])) == {"png"}
    assert (metrics.hits, metrics.misses) == (2, 2)
    store.close()
