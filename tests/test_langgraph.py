"""The LangGraph integration with the real langgraph: the optical pre-model hook (and the
post-model hook) in the prebuilt ReAct agent, driven by a scripted chat model (a
`BaseChatModel` subclass: langchain-core's own fake models cannot bind tools) over a long
session: the model reads the optical context (pinned system prompt first, page images once
the session is longer than the window holds as text, the latest user message or tool result
last), and every message of the agent, tool calls and tool results included, is stored
once."""

from __future__ import annotations

import asyncio
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import Field

from optical_memory.integrations.langchain import to_openai
from optical_memory.integrations.langgraph import (
    optical_post_model_hook,
    optical_pre_model_hook,
    store_new_messages,
)
from optical_memory.memory import OpticalMemory
from optical_memory.policy import Policy

README = Path(__file__).resolve().parent.parent / "README.md"
SYSTEM = "You are the launch team's assistant. Use the budget tool for numbers."

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # moved to langchain.agents in LangGraph 1.0; kept until 2.0
    from langgraph.prebuilt import create_react_agent

pytestmark = pytest.mark.filterwarnings("ignore:create_react_agent has been moved")


class ScriptedChatModel(BaseChatModel):
    """A chat model that binds tools and answers by rule, recording what it received: a
    question with "budget" in it gets a tool call, a tool result gets an answer quoting it,
    anything else a short reply."""

    received: list[list[BaseMessage]] = Field(default_factory=list)
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        return self

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.received.append(list(messages))
        self.calls += 1
        last = messages[-1]
        if isinstance(last, ToolMessage):
            reply = AIMessage(f"The budget of item {last.content}.")
        elif isinstance(last, HumanMessage) and "budget" in str(last.content):
            item = int(re.search(r"item (\d+)", str(last.content))[1])
            reply = AIMessage(
                "",
                tool_calls=[{"name": "budget", "args": {"item": item}, "id": f"call_{self.calls}"}],
            )
        else:
            reply = AIMessage(f"Noted ({self.calls}).")
        return ChatResult(generations=[ChatGeneration(message=reply)])


@tool
def budget(item: int) -> str:
    """The budget of an item of the launch plan."""
    return f"{item} is {item * 1250} EUR"


def question(i: int) -> str:
    if i % 3 == 2:
        return f"What is the budget of item {i}?"
    return f"Note {i}: the review of server {i} moves to room {100 + i}, says the launch lead."


def make_agent(mem: OpticalMemory, model: ScriptedChatModel, post: bool = True) -> Any:
    return create_react_agent(
        model,
        [budget],
        pre_model_hook=optical_pre_model_hook(mem),
        post_model_hook=optical_post_model_hook(mem) if post else None,
        checkpointer=InMemorySaver(),
    )


def test_react_agent_reads_the_optical_context_and_stores_each_message_once(tmp_path):
    # a history that fits the window is sent as text: a small window, so that pages come
    # within the first questions (221 short messages fit the default 8192 as text)
    mem = OpticalMemory(tmp_path / "m.sqlite3", policy=Policy(window=1150))
    model = ScriptedChatModel()
    agent = make_agent(mem, model)
    config = {"configurable": {"thread_id": "agent-1"}}
    steps: list[tuple[int, int]] = []  # (first model call of the question, its index)
    state: dict[str, Any] = {}
    for i in range(60):
        new = [HumanMessage(question(i))]
        if i == 0:
            new.insert(0, SystemMessage(SYSTEM))
        steps.append((len(model.received), i))
        state = agent.invoke({"messages": new}, config)
    messages = state["messages"]

    # every message of the state is stored once, under its LangGraph id, exactly as given
    turns = mem.turns("agent-1")
    assert len(turns) == len(messages) == 60 + 20 * 3 + 40 + 1
    assert [t.turn_id for t in turns] == [m.id for m in messages]
    assert [t.to_message() for t in turns] == [to_openai(m) for m in messages]
    calls = [t.to_message() for t in turns if t.to_message().get("tool_calls")]
    results = [t.to_message() for t in turns if t.role == "tool"]
    assert len(calls) == len(results) == 20  # each tool call and each result once
    assert [c["tool_calls"][0]["id"] for c in calls] == [r["tool_call_id"] for r in results]
    assert calls[0]["tool_calls"][0]["function"] == {"name": "budget", "arguments": '{"item":2}'}
    assert results[0]["content"] == "2 is 2500 EUR" and results[0]["name"] == "budget"

    # the model read the optical context: pinned system prompt first, the latest message last
    assert len(model.received) == 80
    for first, i in steps:
        received = model.received[first]
        assert received[0] == SystemMessage(SYSTEM)
        assert received[-1] == HumanMessage(question(i))  # the query
        if i % 3 == 2:  # the tool step: the call and its result, last
            after = model.received[first + 1]
            assert after[0] == SystemMessage(SYSTEM)
            assert (
                isinstance(after[-1], ToolMessage) and after[-1].content == f"{i} is {i * 1250} EUR"
            )
            assert isinstance(after[-2], AIMessage) and after[-2].tool_calls[0]["args"] == {
                "item": i
            }
            assert after[-3] == HumanMessage(question(i))
    with_pages = [any(_images(m) for m in r) for r in model.received]
    # the first calls fit the window as text; once the history is well past the window's
    # size every call reads pages (near its size a call with a short query or none, a tool
    # result, may still fit as text)
    assert not with_pages[0] and all(with_pages[-30:])
    last = model.received[-1]
    assert len(last) < 30 < len(messages)  # 220 messages, read from page images and recent text
    page_message = last[1]
    assert isinstance(page_message, HumanMessage) and len(_images(page_message)) >= 2

    # the state itself is untouched: the hook only sets what the model reads
    assert messages[0] == SystemMessage(SYSTEM, id=messages[0].id)
    assert all(not _images(m) for m in messages)


def test_hooks_are_idempotent(tmp_path):
    mem = OpticalMemory(tmp_path / "m.sqlite3")
    model = ScriptedChatModel()
    agent = make_agent(mem, model)
    config = {"configurable": {"thread_id": "again"}}
    for i in range(3):
        agent.invoke({"messages": [HumanMessage(question(i))]}, config)
    state = agent.get_state(config).values
    count = len(mem.turns("again"))
    assert count == len(state["messages"]) == 8
    pre, post = optical_pre_model_hook(mem), optical_post_model_hook(mem)
    for _ in range(3):  # a retried step, a resumed graph: nothing is stored twice
        assert post(state, config) == {}
        context = pre(state, config)["llm_input_messages"]
        assert context[-1] == AIMessage("The budget of item 2 is 2500 EUR.")
    assert len(mem.turns("again")) == count
    assert store_new_messages(mem, "again", state["messages"]) == 0
    fresh = [HumanMessage("one more", id="h-more")]
    assert store_new_messages(mem, "again", [*state["messages"], *fresh]) == 1
    assert mem.turns("again")[-1].turn_id == "h-more"


def test_pre_model_hook_alone_stores_the_answer_on_the_next_step(tmp_path):
    mem = OpticalMemory(tmp_path / "m.sqlite3")
    model = ScriptedChatModel()
    agent = make_agent(mem, model, post=False)
    config = {"configurable": {"thread_id": "pre-only"}}
    agent.invoke({"messages": [HumanMessage(question(2))]}, config)
    roles = [t.role for t in mem.turns("pre-only")]
    assert roles == ["user", "assistant", "tool"]  # the final answer is not stored yet
    state = agent.invoke({"messages": [HumanMessage(question(3))]}, config)
    assert [t.turn_id for t in mem.turns("pre-only")] == [m.id for m in state["messages"][:-1]]


def test_session_from_argument_or_config_and_async(tmp_path):
    mem = OpticalMemory(tmp_path / "m.sqlite3")
    model = ScriptedChatModel()
    agent = create_react_agent(
        model,
        [budget],
        pre_model_hook=optical_pre_model_hook(mem, "fixed-session"),
        post_model_hook=optical_post_model_hook(mem, "fixed-session"),
    )
    state = asyncio.run(agent.ainvoke({"messages": [HumanMessage(question(5))]}))
    assert [t.turn_id for t in mem.turns("fixed-session")] == [m.id for m in state["messages"]]
    assert [t.role for t in mem.turns("fixed-session")] == [
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    with pytest.raises(ValueError, match="no session id"):
        optical_pre_model_hook(mem)({"messages": [HumanMessage("hi")]}, {})
    no_ids = {"messages": [SystemMessage("Be terse."), HumanMessage("hi")]}  # no add_messages
    context = optical_pre_model_hook(mem, "no-ids")(no_ids, {})["llm_input_messages"]
    assert context == [SystemMessage("Be terse."), HumanMessage("hi")]
    optical_pre_model_hook(mem, "no-ids")(no_ids, {})
    assert [t.role for t in mem.turns("no-ids")] == ["system", "user"]  # ids from place + content


def test_a_user_message_with_an_image_is_stored_before_the_context(tmp_path):
    mem = OpticalMemory(tmp_path / "m.sqlite3")
    image = {"type": "image_url", "image_url": {"url": "https://example.com/plan.png"}}
    state = {"messages": [HumanMessage([{"type": "text", "text": "See this"}, image], id="u1")]}
    context = optical_pre_model_hook(mem, "img")(state, {})["llm_input_messages"]
    assert context == [HumanMessage([{"type": "text", "text": "See this"}, image])]
    assert [t.turn_id for t in mem.turns("img")] == ["u1"]


def _images(message: BaseMessage) -> list[dict]:
    if not isinstance(message.content, list):
        return []
    return [p for p in message.content if isinstance(p, dict) and p.get("type") == "image_url"]


# --- the README example --------------------------------------------------------------------
def test_readme_langgraph_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPTICAL_MEMORY_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the example's memory.sqlite3
    text = README.read_text(encoding="utf-8")
    section = re.split(r"\n##+ ", text.split("### LangChain and LangGraph", 1)[1], maxsplit=1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[1]
    assert "pre_model_hook" in code
    exec(compile(code, "README.md (LangGraph)", "exec"), {"__name__": "__readme__"})  # noqa: S102 (the example)
    assert capsys.readouterr().out.split("\n")[:2] == ["Hello!", "['system', 'user', 'assistant']"]
