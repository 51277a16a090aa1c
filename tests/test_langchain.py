"""The LangChain integration with the real langchain-core: `OpticalChatMessageHistory` under
`RunnableWithMessageHistory` with langchain-core's own fake chat model across 300 turns (the
memory keeps every turn, the model reads the optical context: pages as image parts), and
lossless round trips of every message field both ways (LangChain <-> the stored OpenAI
format), on both stores."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables.history import RunnableWithMessageHistory
from PIL import Image

from optical_memory.integrations.langchain import (
    OpticalChatMessageHistory,
    from_openai,
    optical_context,
    to_openai,
)
from optical_memory.memory import OpticalMemory
from optical_memory.messages import IMAGE_SLOT, render_text
from optical_memory.policy import Policy

README = Path(__file__).resolve().parent.parent / "README.md"


def png_b64(seed: int, size: tuple[int, int] = (40, 30)) -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 160, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def png_url(seed: int) -> str:
    return "data:image/png;base64," + png_b64(seed)


def langchain_log() -> list[BaseMessage]:
    """LangChain messages with every field the converters carry."""
    return [
        SystemMessage("You are a travel assistant.", name="rules", id="m-sys"),
        SystemMessage("Use tools for weather.", additional_kwargs={"__openai_role__": "developer"}),
        HumanMessage(
            [
                {"type": "text", "text": "Weather in Paris? My screenshot:"},
                {"type": "image_url", "image_url": {"url": png_url(1), "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/map.png"}},
            ],
            name="alice",
            id="m-user",
        ),
        AIMessage(
            "",
            tool_calls=[
                {"name": "weather", "args": {"city": "Paris", "days": [1, 2]}, "id": "call_1"},
                {"name": "clock", "args": {}, "id": "call_2"},
            ],
            id="m-call",
            name="planner",
            usage_metadata={"input_tokens": 12, "output_tokens": 5, "total_tokens": 17},
            response_metadata={"model_name": "fake", "finish_reason": "tool_calls"},
        ),
        ToolMessage("18°C, sunny", tool_call_id="call_1", name="weather", id="m-tool1"),
        ToolMessage(
            [{"type": "text", "text": "no clock"}],
            tool_call_id="call_2",
            status="error",
            artifact={"code": 500},
            id="m-tool2",
        ),
        AIMessage("Il fait beau : 18°C.", additional_kwargs={"refusal": None, "trace": [1, 2]}),
        AIMessage(
            "Let me retry.",
            tool_calls=[{"name": "weather", "args": {"city": "Lyon"}, "id": "call_3"}],
            invalid_tool_calls=[
                {
                    "name": "clock",
                    "args": "{not json",
                    "id": "call_4",
                    "error": "bad JSON",
                    "type": "invalid_tool_call",
                }
            ],
        ),
        ToolMessage("12°C", tool_call_id="call_3"),
        FunctionMessage("done", name="legacy"),
        HumanMessage("Thanks!", additional_kwargs={"turn_id": "not an instruction"}),
    ]


def openai_log() -> list[dict[str, Any]]:
    """Stored OpenAI-format messages as an OpenAI client logs them."""
    return [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}], "name": "policy"},
        {
            "role": "user",
            "name": "bob",
            "content": [
                {"type": "text", "text": "Compare these:"},
                {"type": "image_url", "image_url": {"url": png_url(2), "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}},
            ],
            "metadata": {"client": "web"},
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "search", "arguments": '{"q": "Paris", "n": 3}'},
                },
                {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": ""}},
                {"id": "call_c", "type": "custom", "custom": {"name": "sh", "input": "ls"}},
            ],
            "refusal": None,
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "3 results"},
        {
            "role": "tool",
            "tool_call_id": "call_b",
            "name": "now",
            "content": [{"type": "text", "text": "noon"}],
        },
        {"role": "tool", "tool_call_id": "call_c", "content": "a.txt"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_d",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"x":1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_d", "content": "1"},
        {"role": "assistant", "content": None, "function_call": {"name": "old", "arguments": "{}"}},
        {"role": "function", "name": "old", "content": "legacy result"},
        {"role": "assistant", "content": None, "refusal": "I can't help with that."},
        {"role": "assistant", "content": "Done.", "name": "helper"},
    ]


# --- converters and the history -------------------------------------------------------------
def test_langchain_round_trip_keeps_every_field(store):
    mem = OpticalMemory(store)
    history = OpticalChatMessageHistory(mem, "lc-fields")
    log = langchain_log()
    history.add_messages(log)
    assert history.messages == log  # every field: ids, names, tool calls, metadata, artifacts
    stored = [t.to_message() for t in mem.turns("lc-fields")]
    assert [t.turn_id for t in mem.turns("lc-fields")][:1] == ["m-sys"]  # the id is the turn id
    assert stored[1] == {"role": "developer", "content": "Use tools for weather."}
    user = stored[2]
    assert user["name"] == "alice" and user["content"] == log[2].content
    assert IMAGE_SLOT in render_text(user)  # the data-URL image is drawn on its page
    call = stored[3]
    assert call["role"] == "assistant" and call["content"] is None and call["name"] == "planner"
    assert call["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Paris","days":[1,2]}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
    ]
    assert stored[4]["tool_call_id"] == "call_1" and stored[4]["name"] == "weather"
    assert stored[6]["refusal"] is None and stored[6]["trace"] == [1, 2]  # additional_kwargs
    assert stored[7]["tool_calls"][1]["function"] == {"name": "clock", "arguments": "{not json"}
    assert stored[9] == {"role": "function", "content": "done", "name": "legacy"}
    # an additional_kwargs "turn_id" is data, not the idempotency key
    assert (
        "turn_id" not in stored[10] and mem.turns("lc-fields")[10].turn_id != "not an instruction"
    )


def test_openai_round_trip_keeps_every_field(store):
    mem = OpticalMemory(store)
    log = openai_log()
    mem.extend("oa-fields", log)
    messages = OpticalChatMessageHistory(mem, "oa-fields").messages
    assert [to_openai(m) for m in messages] == log
    dev, system, user, call = messages[:4]
    assert isinstance(dev, SystemMessage) and isinstance(system, SystemMessage)
    assert user.name == "bob" and user.additional_kwargs == {"metadata": {"client": "web"}}
    assert isinstance(call, AIMessage) and call.content == ""
    assert call.tool_calls == [
        {"name": "search", "args": {"q": "Paris", "n": 3}, "id": "call_a", "type": "tool_call"},
        {"name": "now", "args": {}, "id": "call_b", "type": "tool_call"},
    ]
    assert [m.tool_call_id for m in messages[4:7]] == ["call_a", "call_b", "call_c"]
    assert messages[5].name == "now" and messages[5].content == [{"type": "text", "text": "noon"}]
    assert messages[7].additional_kwargs == {}  # built from its tool calls again, exactly
    assert messages[9].additional_kwargs["function_call"] == {"name": "old", "arguments": "{}"}
    assert isinstance(messages[10], FunctionMessage) and messages[10].name == "old"
    assert messages[11].additional_kwargs == {"refusal": "I can't help with that."}
    assert messages[12].name == "helper"


def test_standard_image_blocks_become_openai_parts(tmp_path):
    mem = OpticalMemory(tmp_path / "m.sqlite3")
    history = OpticalChatMessageHistory(mem, "blocks")
    data = png_b64(3)
    history.add_messages(
        [
            HumanMessage(
                [
                    {"type": "text", "text": "v1 block, v0 block, URL block:"},
                    {"type": "image", "base64": data, "mime_type": "image/png"},
                    {
                        "type": "image",
                        "source_type": "base64",
                        "data": data,
                        "mime_type": "image/png",
                    },
                    {"type": "image", "url": "https://example.com/c.png"},
                    {"type": "image_url", "image_url": "https://example.com/d.png"},
                ]
            )
        ]
    )
    (turn,) = mem.turns("blocks")
    parts = turn.to_message()["content"]
    url = "data:image/png;base64," + data
    assert parts[1:] == [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": "https://example.com/c.png"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/d.png"}},
    ]
    assert render_text(turn.to_message()).count(IMAGE_SLOT) == 2
    assert history.messages[0].content == parts  # a form LangChain chat models take


def test_history_unknown_session_clear_and_ids(tmp_path):
    mem = OpticalMemory(tmp_path / "m.sqlite3")
    history = OpticalChatMessageHistory(mem, "h")
    assert history.messages == []
    assert history.context() == []
    assert history.context("Hello?") == [HumanMessage("Hello?")]
    history.add_user_message("hi")
    answer = AIMessage("hello", id="answer-1")
    history.add_messages([answer])
    history.add_messages([answer])  # its id is its turn id: stored once
    assert [m.content for m in history.messages] == ["hi", "hello"]
    assert mem.turns("h")[1].turn_id == "answer-1"
    history.clear()
    assert history.messages == [] and "h" not in mem.sessions()


def test_history_async_methods(tmp_path):
    mem = OpticalMemory(tmp_path / "m.sqlite3")
    history = OpticalChatMessageHistory(mem, "async")
    log = langchain_log()

    async def run() -> tuple[list[BaseMessage], list[BaseMessage], list[BaseMessage]]:
        await history.aadd_messages(log)
        stored = await history.aget_messages()
        context = await history.acontext("And tomorrow?")
        await history.aclear()
        return stored, context, await history.aget_messages()

    stored, context, cleared = asyncio.run(run())
    assert stored == log
    assert isinstance(context[0], SystemMessage) and context[-1] == HumanMessage("And tomorrow?")
    assert cleared == []


def test_from_openai_takes_the_optical_context(tmp_path, conversation):
    mem = OpticalMemory(tmp_path / "m.sqlite3", policy=Policy(window=2000))  # < the history
    mem.extend("ctx", [{"role": "system", "content": "Be terse."}, *conversation(60)])
    context = OpticalChatMessageHistory(mem, "ctx").context("When do we launch?")
    expected = [from_openai(m) for m in mem.messages("ctx", "When do we launch?")]
    assert context == expected
    assert context[0] == SystemMessage("Be terse.")
    pages = context[1]
    assert isinstance(pages, HumanMessage)
    images = [p for p in pages.content if p["type"] == "image_url"]
    assert images and all(
        p["image_url"]["url"].startswith("data:image/png;base64,") for p in images
    )
    assert context[-1] == HumanMessage("When do we launch?")


# --- RunnableWithMessageHistory across 300 turns ----------------------------------------------
class ModelInputs(BaseCallbackHandler):
    """LangChain's own callback: the messages each chat model call received."""

    def __init__(self) -> None:
        self.calls: list[list[BaseMessage]] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.calls.append(list(messages[0]))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")
def test_runnable_with_message_history_300_turns(tmp_path, conversation):
    # a window smaller than the history as text, so that later calls read pages
    mem = OpticalMemory(tmp_path / "m.sqlite3", policy=Policy(window=4000))
    turns = conversation(300, seed=7)
    questions = [t["content"] for t in turns[0::2]]
    answers = [t["content"] for t in turns[1::2]]
    model = GenericFakeChatModel(messages=iter([AIMessage(a) for a in answers]))
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are terse."), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    chain = optical_context(mem, query_key="question") | prompt | model
    chat = RunnableWithMessageHistory(
        chain,
        lambda session_id: OpticalChatMessageHistory(mem, session_id),
        input_messages_key="question",
        history_messages_key="history",
    )
    seen = ModelInputs()
    config = {"configurable": {"session_id": "chat-300"}, "callbacks": [seen]}
    outputs = [chat.invoke({"question": q}, config) for q in questions]

    # the memory keeps every turn, each field as LangChain made it
    history = OpticalChatMessageHistory(mem, "chat-300")
    assert len(mem.turns("chat-300")) == 300
    stored = history.messages
    assert [m.content for m in stored] == [t["content"] for t in turns]
    assert stored[1::2] == outputs  # the AI messages whole: ids, metadata
    assert all(isinstance(m, HumanMessage) for m in stored[0::2])
    assert [t.to_message()["role"] for t in mem.turns("chat-300")] == [t["role"] for t in turns]

    # the model read the optical context, not the whole history
    assert len(seen.calls) == 150
    assert seen.calls[0] == [SystemMessage("You are terse."), HumanMessage(questions[0])]
    for i, received in enumerate(seen.calls):
        assert received[0] == SystemMessage("You are terse.")
        assert received[-1] == HumanMessage(questions[i])
        if i < 6:  # a short history is all text
            assert [m.content for m in received[1:-1]] == [t["content"] for t in turns[: 2 * i]]
    last = seen.calls[-1]
    assert len(last) < 40  # 299 earlier turns, read from a few page images and recent text
    pages = last[1]
    assert isinstance(pages, HumanMessage) and isinstance(pages.content, list)
    images = [p for p in pages.content if p["type"] == "image_url"]
    assert len(images) >= 2
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in images)
    assert last[-2].content == answers[-2]  # the latest turns as text, just before the question
    first_with_pages = next(
        i for i, r in enumerate(seen.calls) if any(isinstance(m.content, list) for m in r)
    )
    assert first_with_pages < 20
    assert all(any(isinstance(m.content, list) for m in r) for r in seen.calls[first_with_pages:])


# --- the README example --------------------------------------------------------------------
def readme_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("### LangChain and LangGraph", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_readme_langchain_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPTICAL_MEMORY_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the example's memory.sqlite3
    code = readme_blocks()[0]
    assert "RunnableWithMessageHistory" in code
    exec(compile(code, "README.md (LangChain)", "exec"), {"__name__": "__readme__"})  # noqa: S102 (the example)
    out = capsys.readouterr().out.split("\n")
    assert out[:2] == ["March 3rd.", "4"]
