"""The LlamaIndex integration with the real framework: a `SimpleChatEngine` driven by
LlamaIndex's own mock LLM (the one that records what it was sent) chats over a 300-turn session
held by `OpticalMemoryBuffer`, sync, streamed and async; the LLM receives the optical context
(system prompt first, pages as image blocks and the turns recalled for the question, the
question last) and the memory stores each question and answer once; messages keep their
fields through the memory both ways."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from pathlib import Path

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
    VideoBlock,
)
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.llms.mock import (
    MockFunctionCallingLLMWithChatMemoryOfLastCall,
    MockLLMWithChatMemoryOfLastCall,
)
from llama_index.core.memory.types import BaseMemory
from llama_index.core.tools import FunctionTool
from PIL import Image

from optical_memory.conversation import build_conversation
from optical_memory.integrations.llamaindex import OpticalMemoryBuffer, from_openai, to_openai
from optical_memory.memory import OpticalMemory
from optical_memory.messages import MessageError
from optical_memory.policy import Policy
from optical_memory.prompt import PAGES_INTRO, RECALLED_INTRO

PNG = b"\x89PNG\r\n\x1a\n"
README = Path(__file__).resolve().parent.parent / "README.md"


def png(color: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


@pytest.fixture
def mem(store) -> OpticalMemory:
    return OpticalMemory(store)


@pytest.fixture
def small_mem(store) -> OpticalMemory:
    """A memory whose window is too small for its history as text: a history that fits the
    window is sent as text, the default 8192 would hold most of these tests' turns so."""
    return OpticalMemory(store, policy=Policy(window=2000))


def stored(mem: OpticalMemory, session: str) -> list[dict]:
    return [t.to_message() for t in mem.turns(session)]


# --- a chat engine over a long session ---------------------------------------------------
def test_chat_engine_reads_the_optical_context_and_stores_each_turn_once(small_mem):
    mem = small_mem
    history = build_conversation(300)
    memory = OpticalMemoryBuffer(memory=mem, session_id="launch")
    assert isinstance(memory, BaseMemory)
    memory.set([from_openai(m) for m in history])
    assert stored(mem, "launch") == history

    llm = MockLLMWithChatMemoryOfLastCall(max_tokens=4)  # answers "text text text text"
    engine = SimpleChatEngine.from_defaults(llm=llm, memory=memory)

    def check_call(question: str, turns_before: int) -> None:
        log = stored(mem, "launch")
        assert len(log) == turns_before + 2
        assert log[-2:] == [
            {"role": "user", "content": question},
            {"role": "assistant", "content": "text text text text"},
        ]
        assert [m["content"] for m in log].count(question) == 1
        sent = list(llm.last_chat_messages)
        assert sent[0].role == MessageRole.SYSTEM and sent[0].content == history[0]["content"]
        pages = [b for m in sent for b in m.blocks if isinstance(b, ImageBlock)]
        assert pages and all(str(b.url).startswith("data:image/png;base64,") for b in pages)
        assert all(base64.b64decode(str(b.url).split(",", 1)[1])[:8] == PNG for b in pages)
        (page_message,) = [m for m in sent if any(isinstance(b, ImageBlock) for b in m.blocks)]
        assert page_message.role == MessageRole.USER
        texts = [b.text for b in page_message.blocks if isinstance(b, TextBlock)]
        assert texts[0] == PAGES_INTRO
        labels, recalled = texts[1 : len(pages) + 1], texts[len(pages) + 1 :]
        assert len(labels) == len(pages) and all(lb.startswith("turns ") for lb in labels)
        # SimpleChatEngine puts the question, then gets the context without `input`: no
        # query, so no turns recalled verbatim after the pages
        assert recalled == []
        assert sent[-1].role == MessageRole.USER and sent[-1].content == question
        assert [m.content for m in sent].count(question) == 1
        assert len(sent) < 40  # 300 turns: most of them are on the pages

    engine.chat("When do we launch, and what is the budget?")
    check_call("When do we launch, and what is the budget?", 300)

    streamed = engine.stream_chat("And the venue?")
    assert "".join(streamed.response_gen) == "text text text text"  # then joins the writer
    check_call("And the venue?", 302)

    answer = asyncio.run(engine.achat("Who reviews the slides?"))
    assert answer.response == "text text text text"
    check_call("Who reviews the slides?", 304)

    everything = memory.get_all()
    assert [to_openai(m) for m in everything] == stored(mem, "launch")
    assert len(everything) == 306 and engine.chat_history == everything


# FunctionAgent's workflow inspects its own members, pydantic v1 names included: not ours
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning")
def test_function_agent_stores_its_tool_calls_and_sees_the_question_once(small_mem):
    """LlamaIndex's FunctionAgent with its mock function-calling LLM (which calls every tool,
    then answers): the memory keeps the question, the tool call, its result and the answer
    once each; the second model call (after `aget(input=question)`) has the question once."""

    def launch_date(city: str = "Paris") -> str:
        """The launch date in a city."""
        return f"March 3rd in {city}"

    mem = small_mem
    history = build_conversation(150)
    memory = OpticalMemoryBuffer(memory=mem, session_id="agent")
    memory.set([from_openai(m) for m in history])
    llm = MockFunctionCallingLLMWithChatMemoryOfLastCall()
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(launch_date)], llm=llm)

    async def run() -> str:
        return str(await agent.run("When do we launch?", memory=memory))

    assert asyncio.run(run()) == "Tool calls complete."
    question, call, result, answer = stored(mem, "agent")[150:]
    assert question == {"role": "user", "content": "When do we launch?"}
    (tool_call,) = call["tool_calls"]
    assert call["content"] is None and tool_call["function"] == {
        "name": "launch_date",
        "arguments": '{"city": "Paris"}',
    }
    assert result == {
        "role": "tool",
        "content": "March 3rd in Paris",
        "tool_call_id": tool_call["id"],
    }
    assert answer == {"role": "assistant", "content": "Tool calls complete."}
    sent = list(llm.last_chat_messages)
    assert sent[0].role == MessageRole.SYSTEM
    assert any(isinstance(b, ImageBlock) for m in sent for b in m.blocks)
    # got with input=question: the turns it recalls verbatim follow the pages
    (page_message,) = [m for m in sent if any(isinstance(b, ImageBlock) for b in m.blocks)]
    assert page_message.blocks[0].text == PAGES_INTRO
    assert page_message.blocks[-1].text.startswith(RECALLED_INTRO + "\n(turn ")
    assert [m.content for m in sent].count("When do we launch?") == 1
    assert sent[-1].role == MessageRole.TOOL and sent[-1].content == "March 3rd in Paris"


def test_get_is_the_context_and_input_is_reserved_not_sent(mem):
    memory = OpticalMemoryBuffer(memory=mem, session_id="s")
    assert memory.get() == [] and memory.get_all() == [] and memory.get("hello?") == []
    memory.put_messages([from_openai(m) for m in build_conversation(120)])
    plain = memory.get()
    assert [to_openai(m) for m in plain] == mem.messages("s")
    with_input = memory.get(input="When do we launch?")
    assert [to_openai(m) for m in with_input] == mem.messages("s", "When do we launch?")[:-1]
    assert asyncio.run(memory.aget()) == plain
    # the caller's prefix messages and a token limit come off the window
    assert len(memory.get(initial_token_count=4000)) <= len(plain)
    with pytest.raises(ValueError, match="no positions left"):
        memory.get(initial_token_count=mem.window)
    small = OpticalMemoryBuffer(memory=mem, session_id="s", token_limit=mem.window - 4000)
    assert [to_openai(m) for m in small.get()] == mem.messages("s", budget=mem.window - 4000)


# --- round trips ---------------------------------------------------------------------------
def llamaindex_messages() -> list[ChatMessage]:
    """LlamaIndex messages of every kind the memory keeps as they are."""
    red = data_url(png((200, 30, 30)))
    return [
        ChatMessage(role=MessageRole.SYSTEM, content="You are a travel assistant."),
        ChatMessage(role=MessageRole.DEVELOPER, content="Use tools for weather."),
        ChatMessage(
            role="user", content="Bonjour, je suis Alice.", additional_kwargs={"name": "alice"}
        ),
        ChatMessage(
            role="user",
            blocks=[
                TextBlock(text="What's the weather here? Screenshot:"),
                ImageBlock(url=red, detail="high"),
                ImageBlock(url="https://example.com/map.png"),
                TextBlock(text="Thanks 🙂"),
            ],
        ),
        ChatMessage(role="user", blocks=[TextBlock(text="two"), TextBlock(text="text blocks")]),
        ChatMessage(
            role="assistant",
            content=None,
            additional_kwargs={
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ]
            },
        ),
        ChatMessage(
            role="tool",
            content='{"temp_c": 18}',
            additional_kwargs={"tool_call_id": "call_1", "name": "weather"},
        ),
        ChatMessage(
            role="assistant",
            content="18 °C in Paris.",
            additional_kwargs={"refusal": None, "annotations": []},
        ),
        ChatMessage(role="user", blocks=[AudioBlock(audio=b"RIFF....WAVEfmt ", format="wav")]),
        ChatMessage(
            role="user",
            blocks=[
                TextBlock(text="The brief:"),
                DocumentBlock(data=b"%PDF-1.4 tiny", title="brief.pdf"),
            ],
        ),
        ChatMessage(role="assistant", content=""),
    ]


def test_llamaindex_messages_come_back_equal(mem):
    memory = OpticalMemoryBuffer(memory=mem, session_id="trip")
    messages = llamaindex_messages()
    for m in messages[:3]:
        memory.put(m)
    memory.put_messages(messages[3:])
    assert memory.get_all() == messages
    assert asyncio.run(memory.aget_all()) == messages
    log = stored(mem, "trip")
    assert log[2] == {"role": "user", "content": "Bonjour, je suis Alice.", "name": "alice"}
    assert log[3]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": data_url(png((200, 30, 30))), "detail": "high"},
    }
    assert log[3]["content"][2] == {
        "type": "image_url",
        "image_url": {"url": "https://example.com/map.png"},
    }
    assert log[4]["content"] == [
        {"type": "text", "text": "two"},
        {"type": "text", "text": "text blocks"},
    ]
    assert log[5] == {"role": "assistant", "content": None, **messages[5].additional_kwargs}
    assert log[6] == {
        "role": "tool",
        "content": '{"temp_c": 18}',
        "tool_call_id": "call_1",
        "name": "weather",
    }
    assert log[8]["content"] == [
        {
            "type": "input_audio",
            "input_audio": {
                "data": base64.b64encode(b"RIFF....WAVEfmt ").decode(),
                "format": "wav",
            },
        }
    ]
    assert log[9]["content"][1]["type"] == "file"
    assert log[9]["content"][1]["file"]["filename"] == "brief.pdf"
    assert log[9]["content"][1]["file"]["file_data"].endswith(
        base64.b64encode(b"%PDF-1.4 tiny").decode()
    )


def test_converted_forms(mem):
    """What LlamaIndex has in a form of its own comes back in the form an OpenAI log keeps."""
    memory = OpticalMemoryBuffer(memory=mem, session_id="forms")
    blue = png((20, 40, 220))
    memory.put_messages(
        [
            ChatMessage(role="user", blocks=[TextBlock(text="see"), ImageBlock(image=blue)]),
            ChatMessage(
                role="assistant",
                blocks=[
                    ThinkingBlock(content="they want the weather"),
                    ToolCallBlock(
                        tool_call_id="c9", tool_name="weather", tool_kwargs={"city": "Köln"}
                    ),
                ],
            ),
            ChatMessage(role="tool", content="rain", additional_kwargs={"tool_call_id": "c9"}),
            ChatMessage(role=MessageRole.CHATBOT, content="Rain in Köln."),
            ChatMessage(role="user", content="retry-safe", additional_kwargs={"turn_id": "q-7"}),
        ]
    )
    memory.put(ChatMessage(role="user", content="retry-safe", additional_kwargs={"turn_id": "q-7"}))
    log = stored(mem, "forms")
    assert log == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": data_url(blue)}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c9",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Köln"}'},
                }
            ],
        },
        {"role": "tool", "content": "rain", "tool_call_id": "c9"},
        {"role": "assistant", "content": "Rain in Köln."},
        {"role": "user", "content": "retry-safe"},
    ]
    assert mem.turns("forms")[-1].turn_id == "q-7"  # stored once, under the given id
    back = memory.get_all()
    image = back[0].blocks[1]
    assert isinstance(image, ImageBlock) and str(image.url) == data_url(blue)
    assert image.resolve_image().read() == blue
    assert back[1].blocks == [] and back[1].additional_kwargs == {
        "tool_calls": log[1]["tool_calls"]
    }
    with pytest.raises(ValueError, match="VideoBlock"):
        memory.put(ChatMessage(role="user", blocks=[VideoBlock(url="https://example.com/v.mp4")]))
    with pytest.raises(ValueError, match="'content'"):
        to_openai(ChatMessage(role="user", content="x", additional_kwargs={"content": "y"}))
    assert len(stored(mem, "forms")) == 5


def openai_log() -> list[dict]:
    """An OpenAI client's log: fields in the client's order, nulls, parts, tools, extras."""
    return [
        {"role": "system", "content": "You are a travel assistant. Réponds en français."},
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "Weather in Paris? Screenshot and map:"},
                {
                    "type": "image_url",
                    "image_url": {"url": data_url(png((9, 99, 9))), "detail": "low"},
                },
                {"type": "image_url", "image_url": {"url": "https://example.com"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "map", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "18C, sunny"},
        {
            "role": "tool",
            "tool_call_id": "call_b",
            "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "done"}],
        },
        {
            "role": "assistant",
            "content": "18 °C et du soleil.",
            "annotations": [],
            "metadata": {"latency_ms": 812},
        },
        {"role": "function", "name": "legacy", "content": None},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "legacy", "arguments": "{}"},
        },
    ]


def test_openai_messages_keep_their_fields_through_llamaindex(mem):
    log = openai_log()
    mem.extend("oa", log, turn_ids=[f"t{i}" for i in range(len(log))])
    memory = OpticalMemoryBuffer(memory=mem, session_id="oa")
    back = [to_openai(m) for m in memory.get_all()]
    assert back == log  # dicts: every field and value (key order aside)
    assert json.dumps(back, sort_keys=True) == json.dumps(log, sort_keys=True)
    assert memory.get_all()[1].additional_kwargs == {"name": "alice"}
    assert str(memory.get_all()[1].blocks[2].url) == "https://example.com"  # not normalised

    # setting the history it holds changes nothing: same turns, ids, pages
    before = mem.turns("oa")
    memory.set(memory.get_all())
    assert mem.turns("oa") == before
    # a longer history that starts with it appends the rest
    memory.set([*memory.get_all(), ChatMessage(role="user", content="Merci !")])
    assert mem.turns("oa")[:-1] == before and stored(mem, "oa")[-1]["content"] == "Merci !"
    # a different history replaces it
    memory.set([ChatMessage(role="user", content="new start")])
    assert stored(mem, "oa") == [{"role": "user", "content": "new start"}]


def test_set_checks_everything_first_and_reset_deletes(mem):
    memory = OpticalMemoryBuffer(memory=mem, session_id="keep")
    memory.set([from_openai(m) for m in build_conversation(10)])
    bad = ChatMessage(role="user", content="x", additional_kwargs={"tool_calls": []})
    with pytest.raises(MessageError, match="message 1"):
        memory.set([ChatMessage(role="user", content="fine"), bad])
    with pytest.raises(MessageError):
        memory.put_messages([ChatMessage(role="user", content="fine"), bad])
    assert stored(mem, "keep") == build_conversation(10)
    memory.reset()
    assert memory.get_all() == [] and "keep" not in mem.sessions()
    asyncio.run(memory.aput(ChatMessage(role="user", content="again")))
    assert stored(mem, "keep") == [{"role": "user", "content": "again"}]
    asyncio.run(memory.areset())
    assert memory.get_all() == []


def test_from_defaults(tmp_path):
    memory = OpticalMemoryBuffer.from_defaults(
        store=tmp_path / "m.sqlite3",
        profile="gpt-4o",
        session_id="fd",
        chat_history=[ChatMessage(role="user", content="hi")],
        token_limit=50_000,
    )
    assert memory.memory.window == 128000 and memory.token_limit == 50_000
    assert stored(memory.memory, "fd") == [{"role": "user", "content": "hi"}]
    fresh = OpticalMemoryBuffer.from_defaults(memory=memory.memory, chat_history=[], llm=None)
    assert fresh.session_id != "fd" and fresh.get_all() == []
    with pytest.raises(TypeError, match="profile"):
        OpticalMemoryBuffer.from_defaults(memory=memory.memory, profile="gpt-4o")
    with pytest.raises(ValueError, match="session id"):
        OpticalMemoryBuffer(memory=memory.memory, session_id="")
    assert memory.to_dict() == {
        "session_id": "fd",
        "token_limit": 50_000,
        "class_name": "OpticalMemoryBuffer",
    }
    memory.memory.close()


# --- the README example --------------------------------------------------------------------
def test_readme_llamaindex_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text(encoding="utf-8").split("\n### LlamaIndex\n", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    monkeypatch.chdir(tmp_path)  # it opens "memory.sqlite3" here
    scope: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md (LlamaIndex)", "exec"), scope)  # noqa: S102 (the example)
    assert capsys.readouterr().out == "text text text text text text text text\n"
    assert [to_openai(m) for m in scope["history"]] == [
        {"role": "user", "content": "Our launch date is March 3rd."},
        {"role": "assistant", "content": "text text text text text text text text"},
    ]
    assert scope["context"] == scope["history"]  # two turns: no pages yet
    scope["mem"].close()
