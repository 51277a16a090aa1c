"""LangGraph: hooks that give the model the optical context and keep the memory up to date.

    from langgraph.prebuilt import create_react_agent
    from optical_memory.integrations.langgraph import (
        optical_post_model_hook,
        optical_pre_model_hook,
    )

    agent = create_react_agent(
        model, tools,
        pre_model_hook=optical_pre_model_hook(mem),    # session id: the thread id
        post_model_hook=optical_post_model_hook(mem),  # stores each answer when it comes
        checkpointer=InMemorySaver(),
    )
    agent.invoke({"messages": [("user", "When do we launch?")]},
                 {"configurable": {"thread_id": "chat-42"}})

Before every model call, `optical_pre_model_hook` appends the state's new messages to the
memory (each once: a message's turn id is its LangChain id, which LangGraph's
`add_messages` gives every message of the state) and returns `{"llm_input_messages":
context}`: the model reads the optical context (`OpticalMemory.messages`: pinned system
turns first, earlier turns as page images, recent turns as text, the latest user message
last, as the query) instead of the whole state, which stays as it is. The hook is a plain
graph node, usable before the model node of any graph whose state has "messages" and
"llm_input_messages". `optical_post_model_hook` only appends (the model's answer, as
soon as it is there), for `create_react_agent(..., post_model_hook=...)`; without it the
answer is stored by the next model step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.runnables import RunnableConfig

from optical_memory.integrations.langchain import messages_from_openai, to_openai, turn_id_for
from optical_memory.memory import OpticalMemory, UnknownSessionError, check_id
from optical_memory.messages import dump_json

__all__ = ["optical_post_model_hook", "optical_pre_model_hook", "store_new_messages"]

Hook = Callable[[Any, RunnableConfig], dict[str, Any]]


def optical_pre_model_hook(
    memory: OpticalMemory,
    session_id: str | None = None,
    *,
    budget: int | None = None,
    config_key: str = "thread_id",
) -> Hook:
    """A pre-model hook (a graph node) for `create_react_agent(pre_model_hook=...)`.

    `session_id`: the memory session; None: `config["configurable"][config_key]` (the
    thread id) of each run. `budget`: the window to plan the context for (default: the
    memory's). The latest message, when it is a plain user message (text, no name) not yet
    stored, is the query of the context and stored after it is planned.
    """

    def pre_model_hook(state: Any, config: RunnableConfig) -> dict[str, Any]:
        sid = _session(session_id, config, config_key)
        messages = _messages_of(state)
        new = _unstored(memory, sid, messages)
        query = None
        if new and _is_query(messages[-1]):
            query = messages[-1].content
            _store(memory, sid, new[:-1])
        else:
            _store(memory, sid, new)
        try:
            context = memory.messages(sid, query, budget)
        except UnknownSessionError:  # nothing stored yet: the question alone
            context = [{"role": "user", "content": query}] if query else []
        if query is not None:
            _store(memory, sid, new[-1:])
        return {"llm_input_messages": messages_from_openai(context)}

    return pre_model_hook


def optical_post_model_hook(
    memory: OpticalMemory, session_id: str | None = None, *, config_key: str = "thread_id"
) -> Hook:
    """A post-model hook (a graph node) for `create_react_agent(post_model_hook=...)`
    (`version="v2"`, the default): appends the state's new messages, the model's answer
    among them, to the memory; changes nothing in the state."""

    def post_model_hook(state: Any, config: RunnableConfig) -> dict[str, Any]:
        sid = _session(session_id, config, config_key)
        messages = _messages_of(state)
        _store(memory, sid, _unstored(memory, sid, messages))
        return {}

    return post_model_hook


def store_new_messages(
    memory: OpticalMemory, session_id: str, messages: Sequence[BaseMessage]
) -> int:
    """Append the messages after the last one the session already holds (by turn id) in one
    batch; returns how many were appended."""
    new = _unstored(memory, session_id, messages)
    _store(memory, session_id, new)
    return len(new)


# --- helpers ---------------------------------------------------------------------------
def _session(session_id: str | None, config: RunnableConfig, key: str) -> str:
    if session_id is not None:
        return session_id
    sid = (config.get("configurable") or {}).get(key)
    if sid is None:
        raise ValueError(
            f"no session id: pass session_id= to the hook or run the graph with "
            f"config={{'configurable': {{{key!r}: ...}}}}"
        )
    return str(sid)


def _messages_of(state: Any) -> list[BaseMessage]:
    messages = state.get("messages") if isinstance(state, Mapping) else state.messages
    return list(messages or [])


def _is_query(message: BaseMessage) -> bool:
    return (
        isinstance(message, HumanMessage)
        and isinstance(message.content, str)
        and bool(message.content)
        and message.name is None
        and not message.additional_kwargs
        and not message.response_metadata
    )


def _unstored(
    memory: OpticalMemory, session_id: str, messages: Sequence[BaseMessage]
) -> list[tuple[str, BaseMessage]]:
    """(turn id, message) of the messages after the last one already stored."""
    check_id(session_id, "session id")
    ids = [_turn_id(m, i) for i, m in enumerate(messages)]
    start = len(messages)
    while start > 0 and memory.index_of(session_id, ids[start - 1]) is None:
        start -= 1
    return list(zip(ids[start:], messages[start:]))


def _turn_id(message: BaseMessage, position: int) -> str:
    """The message's id; for a message without one (a state without LangGraph's
    `add_messages`), a digest of its place and content."""
    tid = turn_id_for(message)
    if tid is not None:
        return tid
    digest = hashlib.sha256(f"{position}\n{dump_json(to_openai(message))}".encode()).hexdigest()
    return "lc-" + digest[:48]


def _store(memory: OpticalMemory, session_id: str, new: Sequence[tuple[str, BaseMessage]]) -> None:
    if new:
        memory.extend(session_id, [to_openai(m) for _, m in new], turn_ids=[t for t, _ in new])
