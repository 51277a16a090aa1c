"""LangChain: a chat message history over an `OpticalMemory` session, and converters.

    from optical_memory import OpticalMemory
    from optical_memory.integrations.langchain import OpticalChatMessageHistory

    mem = OpticalMemory()
    history = OpticalChatMessageHistory(mem, "chat-42")
    history.add_messages([HumanMessage("Our launch date is March 3rd."), AIMessage("Noted.")])
    history.messages              # every stored turn, as LangChain messages
    history.context("When?")      # the optical context for a model call: pages as image parts

`OpticalChatMessageHistory` is a `BaseChatMessageHistory`, so it plugs into
`RunnableWithMessageHistory`; `optical_context(memory)` is the runnable that puts the
optical context (`OpticalMemory.messages`) in place of the full history before the prompt.

The converters (`to_openai`, `from_openai`) map LangChain messages to the OpenAI chat
format the memory stores and back, lossless for what both can express: system (and
developer), human, AI, tool and function messages; `name`; AI `tool_calls` ({name, args,
id} <-> {id, type: function, function: {name, arguments: JSON text}}; the exact
arguments text of a stored call survives too); `tool_call_id`; content as a string or a
list of parts (OpenAI parts kept as given; LangChain's standard image, audio and file
blocks become OpenAI parts). What the OpenAI format has no field for is kept in one extra
field "langchain" of the stored message (the message id, `response_metadata`,
`usage_metadata`, a tool message's `artifact` and `status`, other `additional_kwargs`),
which the memory keeps but never sends to a model. OpenAI fields LangChain has no field
for (`refusal`, `audio`, `function_call`, any other) go to `additional_kwargs`, as in
langchain-openai. Not expressible in LangChain, so normalised: an assistant message with
tool calls and empty or absent content comes back with null content.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    convert_to_openai_data_block,
    is_data_content_block,
)
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.runnables.config import run_in_executor

from optical_memory.memory import OpticalMemory, UnknownSessionError, check_id
from optical_memory.messages import dump_json

__all__ = [
    "STASH_KEY",
    "OpticalChatMessageHistory",
    "from_openai",
    "messages_from_openai",
    "messages_to_openai",
    "optical_context",
    "to_openai",
    "turn_id_for",
]

STASH_KEY = "langchain"  # the stored message's field for what only LangChain has
_DEVELOPER = "__openai_role__"  # langchain-openai's marker of a developer message
_ROLES = {"human": "user", "ai": "assistant", "user": "user", "assistant": "assistant"}
_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_ANSWERED = ("tool_calls", "function_call", "refusal", "audio")  # fields that allow null content


# --- LangChain -> OpenAI ---------------------------------------------------------------
def to_openai(message: BaseMessage) -> dict[str, Any]:
    """The message in the OpenAI chat format, as the memory stores it (see the module doc)."""
    extra = dict(message.additional_kwargs)
    role = _role_of(message, extra)
    out: dict[str, Any] = {"role": role, "content": _content_to_openai(message.content)}
    if message.name is not None:
        out["name"] = message.name
    stash: dict[str, Any] = {}
    if isinstance(message, AIMessage):
        calls, raw_kept = _calls_to_openai(message, extra)
        if calls:
            out["tool_calls"] = calls
        if raw_kept:
            stash["raw_tool_calls"] = True
        if message.invalid_tool_calls and _parse_calls(calls)[1] != message.invalid_tool_calls:
            stash["invalid_tool_calls"] = [dict(c) for c in message.invalid_tool_calls]
        if message.usage_metadata is not None:
            stash["usage_metadata"] = dict(message.usage_metadata)
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
        if message.artifact is not None:
            stash["artifact"] = message.artifact
        if message.status != "success":
            stash["status"] = message.status
    # fields this converter sets, or that only an assistant message may have, stay in the stash
    owned = {"role", "content", "name", "tool_calls", "tool_call_id", "turn_id", STASH_KEY}
    if role != "tool":
        owned.discard("tool_call_id")
    kept = {}
    for key, value in extra.items():
        if _dumps(value) is None:
            _warn_not_json(f"additional_kwargs[{key!r}]")
        elif key in owned:
            kept[key] = value
        else:
            out[key] = value
    if role == "assistant" and out["content"] == "" and any(k in out for k in _ANSWERED):
        out["content"] = None  # the OpenAI convention (and langchain-openai's)
    if kept:
        stash["additional_kwargs"] = kept
    if message.id is not None:
        stash["id"] = message.id
    if message.response_metadata:
        stash["response_metadata"] = dict(message.response_metadata)
    stash = _json_safe(stash)
    if stash:
        out[STASH_KEY] = stash
    return out


def messages_to_openai(messages: Iterable[BaseMessage]) -> list[dict[str, Any]]:
    return [to_openai(m) for m in messages]


def _role_of(message: BaseMessage, extra: dict[str, Any]) -> str:
    if isinstance(message, SystemMessage):
        if extra.get(_DEVELOPER) == "developer":
            del extra[_DEVELOPER]
            return "developer"
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, (AIMessage, AIMessageChunk)):
        return "assistant"
    if isinstance(message, ToolMessage):
        return "tool"
    if isinstance(message, FunctionMessage):
        return "function"
    if isinstance(message, ChatMessage):
        role = _ROLES.get(message.role, message.role)
        if role in _OPENAI_ROLES:
            return role
        raise ValueError(f"a ChatMessage with role {message.role!r} has no OpenAI role")
    raise TypeError(f"cannot store a {type(message).__name__} as a chat turn")


def _content_to_openai(content: str | list[Any]) -> str | list[Any]:
    if isinstance(content, str):
        return content
    parts: list[Any] = []
    for part in content:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        elif (
            isinstance(part, dict)
            and part.get("type") in ("image", "audio", "file")
            and is_data_content_block(part)
        ):
            # LangChain's standard blocks -> OpenAI parts (image_url, input_audio, file)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a file without a name: OpenAI's concern
                    parts.append(convert_to_openai_data_block(part))
            except (ValueError, KeyError):
                parts.append(dict(part))  # as given; the memory says what is wrong with it
        elif (
            isinstance(part, dict)
            and part.get("type") == "image_url"
            and isinstance(part.get("image_url"), str)
        ):
            parts.append({**part, "image_url": {"url": part["image_url"]}})  # the OpenAI shape
        else:
            parts.append(dict(part) if isinstance(part, dict) else part)
    return parts


def _calls_to_openai(message: AIMessage, extra: dict[str, Any]) -> tuple[list[Any], bool]:
    """The OpenAI tool calls of an AI message, and whether they are a raw list that was also
    in its `additional_kwargs` and would not be restored from them alone."""
    built: list[dict[str, Any]] = []
    for call in message.tool_calls:
        built.append(_openai_call(call["id"], call["name"], dump_json(call["args"])))
    for bad in message.invalid_tool_calls:
        built.append(_openai_call(bad.get("id"), bad.get("name") or "", bad.get("args") or ""))
    raw = extra.pop("tool_calls", None)
    if isinstance(raw, list):
        valid, invalid = _parse_calls(raw)
        if valid == message.tool_calls and _same_invalid(invalid, message.invalid_tool_calls):
            # the raw list holds the same calls: keep it (exact arguments text, other types)
            return raw, _dumps(raw) == _dumps(built)
        if not built:
            return raw, False
    elif raw is not None:
        extra["tool_calls"] = raw  # not a list: kept as given in the stash
    return built, False


def _openai_call(call_id: str | None, name: str, arguments: str) -> dict[str, Any]:
    call: dict[str, Any] = {} if call_id is None else {"id": call_id}
    call["type"] = "function"
    call["function"] = {"name": name, "arguments": arguments}
    return call


def _same_invalid(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
    def key(c: Mapping[str, Any]) -> tuple[Any, ...]:
        return (c.get("name"), c.get("args"), c.get("id"))

    return [key(c) for c in a] == [key(c) for c in b]


def _json_safe(stash: dict[str, Any]) -> dict[str, Any]:
    """The stash less any entry that is not JSON (e.g. a Python object as a tool artifact)."""
    out = {}
    for key, value in stash.items():
        try:
            dump_json(value)
        except (TypeError, ValueError):
            _warn_not_json(key)
            continue
        out[key] = value
    return out


def _warn_not_json(what: str) -> None:
    warnings.warn(f"the message's {what} is not JSON: not stored", RuntimeWarning, stacklevel=4)


def _dumps(value: Any) -> str | None:
    try:
        return dump_json(value)
    except (TypeError, ValueError):
        return None


# --- OpenAI -> LangChain ---------------------------------------------------------------
def from_openai(message: Mapping[str, Any]) -> BaseMessage:
    """The LangChain message of a stored OpenAI-format message (a `Turn.to_message()` or one
    of `OpticalMemory.messages`); the inverse of `to_openai`."""
    data = {k: v for k, v in message.items() if k != "turn_id"}
    role = data.pop("role")
    content = data.pop("content", None)
    name = data.pop("name", None)
    stash = data.pop(STASH_KEY, None)
    if not isinstance(stash, Mapping):
        if stash is not None:
            data[STASH_KEY] = stash
        stash = {}
    common: dict[str, Any] = {"name": name}
    if "id" in stash:
        common["id"] = stash["id"]
    if "response_metadata" in stash:
        common["response_metadata"] = dict(stash["response_metadata"])
    extra: dict[str, Any] = {}
    raw_calls = data.pop("tool_calls", None) if role == "assistant" else None
    tool_call_id = data.pop("tool_call_id", None) if role == "tool" else None
    extra.update(data)  # refusal, audio, function_call, any other field
    extra.update(stash.get("additional_kwargs") or {})
    if content is None:
        content = ""
    if role in ("system", "developer"):
        if role == "developer":
            extra = {_DEVELOPER: "developer", **extra}
        return SystemMessage(content=content, additional_kwargs=extra, **common)
    if role == "user":
        return HumanMessage(content=content, additional_kwargs=extra, **common)
    if role == "assistant":
        valid: list[Any] = []
        invalid: list[Any] = []
        if isinstance(raw_calls, list):
            valid, invalid = _parse_calls(raw_calls)
            built = [_openai_call(c["id"], c["name"], dump_json(c["args"])) for c in valid]
            built += [_openai_call(c["id"], c["name"] or "", c["args"] or "") for c in invalid]
            if stash.get("raw_tool_calls") or _dumps(raw_calls) != _dumps(built):
                extra["tool_calls"] = raw_calls
        elif raw_calls is not None:
            extra["tool_calls"] = raw_calls
        if "invalid_tool_calls" in stash:
            invalid = [dict(c) for c in stash["invalid_tool_calls"]]
        usage = stash.get("usage_metadata")
        return AIMessage(
            content=content,
            additional_kwargs=extra,
            tool_calls=valid,
            invalid_tool_calls=invalid,
            usage_metadata=dict(usage) if usage is not None else None,
            **common,
        )
    if role == "tool":
        tool: dict[str, Any] = {}
        if "artifact" in stash:
            tool["artifact"] = stash["artifact"]
        if "status" in stash:
            tool["status"] = stash["status"]
        return ToolMessage(
            content=content,
            tool_call_id=tool_call_id if tool_call_id is not None else "",
            additional_kwargs=extra,
            **tool,
            **common,
        )
    if role == "function":
        return FunctionMessage(content=content, additional_kwargs=extra, **common)
    raise ValueError(f"unknown role {role!r}")


def messages_from_openai(messages: Iterable[Mapping[str, Any]]) -> list[BaseMessage]:
    return [from_openai(m) for m in messages]


def _parse_calls(raw: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """LangChain's tool calls and invalid tool calls of OpenAI function calls (other call
    types have no LangChain form; they stay in `additional_kwargs["tool_calls"]`)."""
    valid: list[Any] = []
    invalid: list[Any] = []
    for call in raw:
        if not isinstance(call, Mapping) or call.get("type", "function") != "function":
            continue
        fn = call.get("function")
        if not isinstance(fn, Mapping):
            continue
        name, arguments, call_id = fn.get("name"), fn.get("arguments"), call.get("id")
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except (AttributeError, ValueError) as exc:
            invalid.append(invalid_tool_call(name=name, args=arguments, id=call_id, error=str(exc)))
            continue
        if isinstance(args, dict):
            valid.append(tool_call(name=name, args=args, id=call_id))
        else:
            invalid.append(
                invalid_tool_call(
                    name=name, args=arguments, id=call_id, error="the arguments are not an object"
                )
            )
    return valid, invalid


# --- turn ids ------------------------------------------------------------------------------
def turn_id_for(message: BaseMessage) -> str | None:
    """The turn id of a message: its LangChain id (hashed if it is not a valid turn id:
    over 256 characters or with control characters), None without one."""
    if message.id is None:
        return None
    mid = str(message.id)
    try:
        return check_id(mid, "message id")
    except (TypeError, ValueError):
        return "lc-" + hashlib.sha256(mid.encode("utf-8", "surrogatepass")).hexdigest()


# --- the history ---------------------------------------------------------------------------
class OpticalChatMessageHistory(BaseChatMessageHistory):
    """LangChain's chat message history over one `OpticalMemory` session.

    `messages`: every stored turn as a LangChain message ([] for a session with no turns);
    `add_messages`: one atomic `extend` (a message's id is its turn id, so adding a message
    again stores nothing twice); `clear`: deletes the session (turns, pages, cache). The
    async variants (`aget_messages`, `aadd_messages`, `aclear`, `acontext`) run these in
    an executor. `context(query)`: the optical context for a model call instead of the
    whole history: pinned system turns, page images, recent turns, the query.
    """

    def __init__(self, memory: OpticalMemory, session_id: str) -> None:
        self.memory = memory
        self.session_id = session_id

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        try:
            turns = self.memory.turns(self.session_id)
        except UnknownSessionError:
            return []
        return [from_openai(t.to_message()) for t in turns]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        batch = []
        for m in messages:
            data = to_openai(m)
            tid = turn_id_for(m)
            if tid is not None:
                data["turn_id"] = tid
            batch.append(data)
        self.memory.extend(self.session_id, batch)

    def clear(self) -> None:
        self.memory.delete(self.session_id)

    def context(
        self, query: str | None = None, budget: int | None = None, *, include_query: bool = True
    ) -> list[BaseMessage]:
        """`OpticalMemory.messages(session_id, query, budget)` as LangChain messages: pinned
        system turns first, one human message of labelled page images (`image_url` parts),
        the recent turns, the query last (unless `include_query` is false); [] (or just the
        query) for a session with no turns."""
        try:
            ctx = self.memory.messages(
                self.session_id, query, budget, include_query=include_query
            )
        except UnknownSessionError:
            ctx = [{"role": "user", "content": query}] if query and include_query else []
        return messages_from_openai(ctx)

    async def acontext(
        self, query: str | None = None, budget: int | None = None
    ) -> list[BaseMessage]:
        return await run_in_executor(None, self.context, query, budget)

    def __repr__(self) -> str:
        return f"OpticalChatMessageHistory(session_id={self.session_id!r})"


def optical_context(
    memory: OpticalMemory,
    *,
    history_key: str = "history",
    query_key: str | None = None,
    session_key: str = "session_id",
    budget: int | None = None,
) -> Runnable[dict[str, Any], dict[str, Any]]:
    """A runnable for a chain under `RunnableWithMessageHistory`: it replaces
    `inputs[history_key]` (the whole history) by the session's optical context, the session
    id read from `config["configurable"][session_key]`. With `query_key`, the context is
    planned for that input's text (its positions reserved) and left without it, for the
    prompt to add as its last message."""

    def replace(inputs: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        session_id = (config.get("configurable") or {}).get(session_key)
        if session_id is None:
            raise ValueError(f"no session id: config['configurable'][{session_key!r}] is unset")
        history = OpticalChatMessageHistory(memory, session_id)
        query = inputs.get(query_key) if query_key is not None else None
        if isinstance(query, str) and query:
            context = history.context(query, budget, include_query=False)
        else:
            context = history.context(None, budget)
        return {**inputs, history_key: context}

    return RunnableLambda(replace, name="optical_context")
