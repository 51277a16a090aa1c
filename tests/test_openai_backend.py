"""OpenAIBackend over real HTTP on loopback: the `openai` client against OpenAITestServer.

What the client sent is read back from the server (`server.requests`), so these tests
check the wire format a vision model would receive: pages as PNG data URLs at the
profile's tier geometry, labelled and oldest first, the turns recalled verbatim for the
query, then the recent turns, then the query.

A history that fits the window is sent as text (no page images), and these profiles'
windows (qwen2.5-vl 32768, gpt-4o 128000) hold the whole 300-turn history: the tests that
need pages in context give each profile a smaller window (WINDOWS).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import time

import openai
import pytest
from PIL import Image

from optical_memory import OpticalMemory
from optical_memory.backends import BackendError, OpenAIBackend, get_profile, open_backend
from optical_memory.conversation import build_conversation
from optical_memory.policy import Policy
from optical_memory.prompt import PAGES_INTRO, RECALLED_INTRO
from optical_memory.testing import OpenAITestServer

SESSION = "s"
QUERY = "When do we launch?"
MODEL = "test-model"
PROFILES = ("deepseek-ocr", "qwen2.5-vl", "gpt-4o")
AGE = r"(just now|\d+ (minute|hour|day)s? ago)"
LABEL = re.compile(r"turns? (\d+)(?:-(\d+))?, " + AGE)
PNG_URL = "data:image/png;base64,"
# windows small enough that the 300-turn history does not fit as text: pages go as images
# (gpt-4o's 4000 sends them at both details, low and high)
WINDOWS = {"deepseek-ocr": 6000, "qwen2.5-vl": 6000, "gpt-4o": 4000}


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A SQLite memory file holding 300 turns in session "s", its page PNGs already cached for
    every profile and window used here (tests copy it: rendering them once keeps the module
    fast)."""
    path = tmp_path_factory.mktemp("history") / "memory.sqlite3"
    for profile in PROFILES:
        with OpticalMemory(path, profile=small_window(profile)) as mem:
            if profile == PROFILES[0]:
                mem.extend(SESSION, build_conversation(300))
            for query in (QUERY, "Where is the party?"):
                assert mem.plan(SESSION, query).in_context(), f"{profile}: no pages in context"
                mem.messages(SESSION, query)
    return path


def small_window(profile: str):
    """The profile with its WINDOWS window."""
    return get_profile(profile).with_window(WINDOWS[profile])


@pytest.fixture
def memory_file(history, tmp_path):
    """A private copy of `history`."""
    return shutil.copy(history, tmp_path / "memory.sqlite3")


def backend(url: str, profile: str = "qwen2.5-vl", **options) -> OpenAIBackend:
    return OpenAIBackend(url, MODEL, profile=profile, **{"timeout": 5, "max_retries": 0, **options})


def decode_png(url: str) -> Image.Image:
    assert url.startswith(PNG_URL)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(PNG_URL) :], validate=True)))
    assert image.format == "PNG"
    return image


def check_messages(messages, mem: OpticalMemory, plan, query: str) -> None:
    """`messages` is the plan's context as OpenAI chat messages, as the module docstring says."""
    tiers = mem.tiers
    pages = plan.in_context()
    assert len(pages) >= 5, "the history should put several pages in context"
    k = next(i for i, m in enumerate(messages) if isinstance(m["content"], list))
    for pinned in messages[:k]:  # pinned turns come first, as text
        assert pinned["role"] in ("system", "developer") and isinstance(pinned["content"], str)
    assert messages[k]["role"] == "user"
    parts = messages[k]["content"]
    assert parts[0] == {"type": "text", "text": PAGES_INTRO}
    assert len(parts) == 1 + 2 * len(pages) + bool(plan.recalled)
    if plan.recalled:  # the turns recalled verbatim, after the page images, in turn order
        assert parts[-1]["type"] == "text"
        check_recalled(parts[-1]["text"], mem, plan)
    previous_last = -1
    for page, label, image in zip(pages, parts[1::2], parts[2::2]):
        assert label["type"] == "text"
        match = LABEL.fullmatch(label["text"])
        assert match, label["text"]
        first, last = int(match[1]), int(match[2] or match[1])
        assert (first, last) == (page.first_turn + 1, page.last_turn + 1)
        assert last > previous_last  # oldest first
        previous_last = last
        assert image["type"] == "image_url"
        tier = tiers[page.mode]
        assert decode_png(image["image_url"]["url"]).size == (tier.width, tier.height)
        if tier.detail is None:
            assert "detail" not in image["image_url"]
        else:
            assert image["image_url"]["detail"] == tier.detail
    # then the recent turns as text, from where the last page ends, then the query
    turn, offset = plan.text_start
    stored = mem.turns(plan.session_id)[turn : plan.turns]  # as they were when planned
    assert stored, "some turns should stay text"
    expected = [
        {"role": t.role, "content": t.content[offset:] if i == 0 else t.content}
        for i, t in enumerate(stored)
    ]
    assert messages[k + 1 : -1] == expected
    assert messages[-1] == {"role": "user", "content": query}


def check_recalled(text: str, mem: OpticalMemory, plan) -> None:
    """`text` holds RECALLED_INTRO, then each turn of `plan.recalled` as its label and its exact
    stored text, oldest first; none of them is in the recent text."""
    turns = mem.turns(plan.session_id)
    numbers = [r.turn for r in plan.recalled]
    assert numbers == sorted(set(numbers))
    assert all(n < plan.text_start[0] and n not in plan.pinned for n in numbers)
    expected = re.escape(RECALLED_INTRO) + "".join(
        "\n"
        + re.escape(f"(turn {n + 1}, ")
        + AGE
        + re.escape(f") {turns[n].role}: {turns[n].content}")
        for n in numbers
    )
    assert re.fullmatch(expected, text, flags=re.DOTALL), text


def check_stored(mem: OpticalMemory, before: int, question: str, answer: str) -> None:
    turns = mem.turns(SESSION)
    assert len(turns) == before + 2
    assert (turns[-2].role, turns[-2].content) == ("user", question)
    assert (turns[-1].role, turns[-1].content) == ("assistant", answer)


# --------------------------------------------------------------------------- answers
@pytest.mark.parametrize("profile", ["qwen2.5-vl", "gpt-4o"])
def test_ask_sends_the_pages_at_the_tier_geometry(openai_server, memory_file, profile):
    window = WINDOWS[profile]
    mem = OpticalMemory(memory_file, model=backend(openai_server.base_url, profile, window=window))
    before = len(mem.turns(SESSION))
    plan = mem.plan(SESSION, QUERY)
    assert plan.recalled, "the query should recall turns verbatim"
    if profile == "gpt-4o":
        details = {mem.tiers[p.mode].detail for p in plan.in_context()}
        assert details == {"low", "high"}, "the plan should exercise both details"

    answer = mem.ask(SESSION, QUERY, max_new_tokens=256)

    [body] = openai_server.requests
    assert body["model"] == MODEL
    assert body["max_tokens"] == 256
    assert not body.get("stream")
    check_messages(body["messages"], mem, plan, QUERY)
    assert answer.text == openai_server.reply
    assert (answer.backend, answer.model, answer.finish_reason) == ("openai", MODEL, "stop")
    assert answer.usage == openai_server.usage
    check_stored(mem, before, QUERY, openai_server.reply)
    mem.close()


@pytest.mark.parametrize("profile", ["qwen2.5-vl", "gpt-4o"])
def test_stream_sends_the_same_context_and_stores_when_complete(
    openai_server, memory_file, profile
):
    model = backend(openai_server.base_url, profile, window=WINDOWS[profile])
    mem = OpticalMemory(memory_file, model=model)
    before = len(mem.turns(SESSION))
    query = "Where is the party?"
    plan = mem.plan(SESSION, query)

    stream = mem.stream(SESSION, query)
    pieces = [next(stream)]
    assert len(mem.turns(SESSION)) == before, "nothing is stored before the answer is complete"
    pieces += list(stream)

    assert len(pieces) > 1
    assert "".join(pieces) == openai_server.reply
    [body] = openai_server.requests
    assert body["model"] == MODEL
    assert body["max_tokens"] == mem.policy.answer_tokens
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    check_messages(body["messages"], mem, plan, query)
    check_stored(mem, before, query, openai_server.reply)
    mem.close()


def test_backend_stream_reports_usage_and_finish_reason(openai_server, memory_file):
    model = backend(openai_server.base_url)
    mem = OpticalMemory(memory_file, model=model)
    result = model.stream(mem.prompt(SESSION, QUERY), max_tokens=64)
    assert result.answer is None
    assert "".join(result) == openai_server.reply
    assert result.answer.text == openai_server.reply
    assert result.answer.usage == openai_server.usage
    assert result.answer.finish_reason == "stop"
    assert openai_server.requests[0]["max_tokens"] == 64
    mem.close()


@pytest.mark.parametrize("profile", [None, "gpt-4o"])
def test_messages_need_no_backend_and_are_json(memory_file, profile):
    if profile is None:  # the default profile, DeepSeek-OCR's, takes the policy's window
        options = {"policy": Policy(window=WINDOWS["deepseek-ocr"])}
    else:
        options = {"profile": small_window(profile)}
    with OpticalMemory(memory_file, **options) as mem:
        assert mem.backend is None
        plan = mem.plan(SESSION, QUERY)
        messages = mem.messages(SESSION, QUERY)
        assert json.loads(json.dumps(messages)) == messages
        check_messages(messages, mem, plan, QUERY)
        assert mem.profile.name == (profile or "deepseek-ocr")


def test_a_history_that_fits_the_window_is_sent_as_text(memory_file):
    """qwen2.5-vl's own 32768-position window holds the whole history as text: no page images,
    nothing recalled, every turn as it was given, then the query."""
    with OpticalMemory(memory_file, profile="qwen2.5-vl") as mem:
        plan = mem.plan(SESSION, QUERY)
        messages = mem.messages(SESSION, QUERY)
        turns = mem.turns(SESSION)
    assert plan.pages and all(p.mode == "text" for p in plan.pages)
    assert plan.in_context() == [] and plan.vision_tokens == 0 and not plan.recalled
    assert plan.text_start == (plan.pages[0].first_turn, 0)
    assert not any(isinstance(m["content"], list) for m in messages)
    assert messages[:-1] == [{"role": t.role, "content": t.content} for t in turns]
    assert messages[-1] == {"role": "user", "content": QUERY}


def test_open_backend_spec_gives_a_working_backend(openai_server, memory_file):
    spec = f"openai:{openai_server.base_url}?model={MODEL}&profile=qwen2.5-vl&timeout=5"
    model = open_backend(spec, max_retries=0)
    assert isinstance(model, OpenAIBackend)
    assert (model.base_url, model.model, model.profile.name) == (
        openai_server.base_url,
        MODEL,
        "qwen2.5-vl",
    )
    with OpticalMemory(memory_file, model=model) as mem:
        assert mem.ask(SESSION, QUERY).text == openai_server.reply
    assert openai_server.requests[0]["model"] == MODEL


# --------------------------------------------------------------------------- bad input
def test_unknown_profile_names_the_valid_ones_and_the_backend():
    with pytest.raises(ValueError, match="unknown profile 'nope'") as info:
        OpenAIBackend("http://127.0.0.1:9/v1", MODEL, profile="nope")
    message = str(info.value)
    assert "http://127.0.0.1:9/v1" in message and MODEL in message
    for name in ("deepseek-ocr", "qwen2.5-vl", "gpt-4o"):
        assert name in message


@pytest.mark.parametrize("url", ["ftp://x", "localhost:8000", "http:///v1", ""])
def test_base_url_must_be_http(url):
    with pytest.raises(ValueError, match="base URL must be http"):
        OpenAIBackend(url, MODEL)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAILURES = {
    "status 500": ({"status": 500}, r"HTTP 500"),
    "timeout": ({"delay": 3.0}, r"no answer within 1 s"),
    "not listening": (None, r"cannot connect"),
}


@pytest.mark.parametrize("call", ["ask", "stream"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_upstream_failure_is_a_backend_error_and_stores_nothing(memory_file, failure, call):
    options, reason = FAILURES[failure]
    with OpenAITestServer(**(options or {})) as server:
        url = server.base_url if options else f"http://127.0.0.1:{closed_port()}/v1"
        mem = OpticalMemory(memory_file, model=backend(url, timeout=1.0))
        before = len(mem.turns(SESSION))
        start = time.monotonic()
        with pytest.raises(BackendError, match=reason) as info:
            if call == "ask":
                mem.ask(SESSION, QUERY)
            else:
                for _ in mem.stream(SESSION, QUERY):
                    pass
        elapsed = time.monotonic() - start
        # the message names the backend: its base URL and model
        assert f"openai backend ({url}, model {MODEL})" in str(info.value)
        assert len(mem.turns(SESSION)) == before
        assert len(server.requests) == (1 if options else 0)
        if failure == "timeout":
            assert elapsed < 2.5, "the client should give up after its 1 s timeout"
        mem.close()


# --------------------------------------------------------------------------- the test server
def test_test_server_rejects_what_a_strict_server_rejects(openai_server):
    client = openai.OpenAI(base_url=openai_server.base_url, api_key="x", max_retries=0)
    ok = {"role": "user", "content": "hi"}
    bad = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [ok, {"role": "user", "content": None}]}, "messages[1].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            "messages[0].content[0].text",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        ({"messages": [ok], "max_tokens": 0}, "max_tokens"),
        ({"messages": [ok], "stream": "yes"}, "stream"),
    ]
    for request, param in bad:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, **request)
        assert info.value.body["param"] == param
        assert set(info.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other-model", messages=[ok])
    assert len(openai_server.requests) == len(bad) + 1
    assert [m.id for m in client.models.list()] == [MODEL]
    reply = client.chat.completions.create(model=MODEL, messages=[ok])
    assert reply.choices[0].message.content == openai_server.reply


@pytest.mark.parametrize("call", ["ask", "stream"])
def test_a_retried_ask_stores_question_and_answer_once(openai_server, memory_file, call):
    mem = OpticalMemory(memory_file, model=backend(openai_server.base_url))
    before = mem.store.turn_count(SESSION)

    def run() -> str:
        if call == "ask":
            return mem.ask(SESSION, QUERY, turn_id="q-17").text
        return "".join(mem.stream(SESSION, QUERY, turn_id="q-17"))

    first, again = run(), run()
    assert first == again == "The launch is on March 3rd."
    assert len(openai_server.requests) == 1  # the retry reads the stored answer
    turns = mem.turns(SESSION)
    assert len(turns) == before + 2
    assert [t.turn_id for t in turns[-2:]] == ["q-17", "q-17/answer"]


def test_the_answer_names_its_turns_and_positions_by_kind(openai_server, memory_file):
    model = backend(openai_server.base_url, window=WINDOWS["qwen2.5-vl"])
    mem = OpticalMemory(memory_file, model=model)
    plan = mem.plan(SESSION, QUERY)
    answer = mem.ask(SESSION, QUERY)
    turns = mem.turns(SESSION)
    assert (answer.question_id, answer.answer_id) == (turns[-2].turn_id, turns[-1].turn_id)
    assert answer.answer_id == f"{answer.question_id}/answer"
    assert answer.positions == plan.positions()
    assert sum(answer.positions.values()) == plan.total
    assert answer.positions["vision"] == plan.vision_tokens > 0
    assert answer.positions["recalled"] == plan.recalled_tokens > 0  # the query's hits
    assert answer.positions["pinned"] == plan.pinned_tokens > 0  # the system prompt


def test_messages_can_leave_the_query_to_the_caller(memory_file):
    mem = OpticalMemory(memory_file, profile="qwen2.5-vl")
    with_query = mem.messages(SESSION, QUERY)
    without = mem.messages(SESSION, QUERY, include_query=False)
    assert with_query[-1] == {"role": "user", "content": QUERY}
    assert without == with_query[:-1]  # the same plan: the query's positions still reserved
    assert mem.index_of(SESSION, mem.turns(SESSION)[7].turn_id) == 7
    assert mem.index_of(SESSION, "no-such-turn") is None
