"""LlamaIndex: `OpticalMemoryBuffer`, a `BaseMemory` over one `OpticalMemory` session.

Install with `pip install "optical-memory[llamaindex]"` (llama-index-core 0.14). A chat engine
or an agent puts its messages into the memory and gets back the optical context for the next
model call: the pinned system prompt, the older turns as labelled page images (`ImageBlock`s
holding PNG data URLs), the recent turns as they were given.

    mem = OpticalMemory("memory.sqlite3", profile="gpt-4o")
    memory = OpticalMemoryBuffer(memory=mem, session_id="chat-42")
    engine = SimpleChatEngine.from_defaults(llm=llm, memory=memory)

The session's turn log is the store's, in the OpenAI message format; `to_openai` and
`from_openai` convert one message each way:

- roles as they are (LlamaIndex's `chatbot` and `model` are stored as `assistant`);
- a single `TextBlock` is string content, no blocks is null content (an assistant message
  with tool calls, a function result; "" for others), anything else a list of parts:
  `TextBlock` <-> `text`, `ImageBlock` <-> `image_url` (its URL kept exactly, an http(s) URL
  never fetched; image bytes or a file become a data URL; `detail` kept), `AudioBlock` <->
  `input_audio`, `DocumentBlock` <-> `file` (a data URL, its title as the filename);
- `ToolCallBlock`s become the message's `tool_calls` (arguments as JSON text); stored tool
  calls come back in `additional_kwargs["tool_calls"]`, exactly as stored;
- every `additional_kwargs` entry is a field of the message (`name`, `tool_calls`,
  `tool_call_id`, `function_call`, `refusal`, any other) and back; `additional_kwargs
  ["turn_id"]`, if set, is the turn's idempotency key (see `OpticalMemory.extend`), not stored;
- `ThinkingBlock`s and `CachePoint`s are dropped (no OpenAI message part holds them); a
  `VideoBlock`, `CitableBlock` or `CitationBlock` is a `ValueError`.

So a LlamaIndex message put into the memory comes back from `get_all` equal, except that an
image given as bytes or a path comes back as a data URL of the same image and tool calls given
as `ToolCallBlock`s come back in `additional_kwargs`. A stored OpenAI message comes back from
`to_openai(from_openai(m))` with the same fields and values, except for what LlamaIndex blocks
cannot tell apart: a list of one text part comes back as a string, a missing `content` as null,
a `refusal` part or a file by id as text.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    AudioBlock,
    CachePoint,
    ChatMessage,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, field_validator
from llama_index.core.memory.types import BaseMemory

from optical_memory.memory import OpticalMemory, UnknownSessionError, check_id
from optical_memory.messages import MessageError, parse_message

__all__ = ["OpticalMemoryBuffer", "from_openai", "to_openai"]

_ASSISTANT_ALIASES = ("chatbot", "model")  # LlamaIndex roles of other providers' assistants
_DROPPED = (ThinkingBlock, CachePoint)  # no part of an OpenAI message holds these
_ANSWERED = ("tool_calls", "function_call", "refusal", "audio")  # what makes null content valid


# --- LlamaIndex -> OpenAI ------------------------------------------------------------------
def to_openai(message: ChatMessage) -> dict[str, Any]:
    """The OpenAI-format message of a LlamaIndex `ChatMessage` (see the module docstring)."""
    role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
    if role in _ASSISTANT_ALIASES:
        role = "assistant"
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(message.blocks):
        if isinstance(block, ToolCallBlock):
            calls.append(_tool_call(block))
        elif not isinstance(block, _DROPPED):
            parts.append(_part(block, f"blocks[{j}]"))
    # the ChatMessage's own serializer makes the values JSON (models dumped, bytes as base64)
    extra: dict[str, Any] = message.model_dump(include={"additional_kwargs"})["additional_kwargs"]
    clash = sorted({"role", "content"} & extra.keys())
    if clash:
        raise ValueError(f"additional_kwargs must not hold {', '.join(map(repr, clash))}")
    if calls:  # as LlamaIndex's OpenAI LLM sends them: the blocks win over additional_kwargs
        extra["tool_calls"] = calls
    if len(parts) == 1 and parts[0]["type"] == "text":
        content: Any = parts[0]["text"]
    elif parts:
        content = parts
    elif role == "function" or (
        role == "assistant" and any(extra.get(k) is not None for k in _ANSWERED)
    ):
        content = None
    else:
        content = ""
    return {"role": role, "content": content, **extra}


def _tool_call(block: ToolCallBlock) -> dict[str, Any]:
    args = block.tool_kwargs
    call: dict[str, Any] = {} if block.tool_call_id is None else {"id": block.tool_call_id}
    call["type"] = "function"
    call["function"] = {
        "name": block.tool_name,
        "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
    }
    return call


def _part(block: Any, where: str) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    if isinstance(block, ImageBlock):
        if block.url is not None:
            url = str(block.url)
        else:
            data = block.resolve_image(as_base64=True).read().decode("ascii")
            if not block.image_mimetype:
                raise ValueError(f"{where}: an ImageBlock whose image type is unknown")
            url = f"data:{block.image_mimetype};base64,{data}"
        image = {"url": url}
        if block.detail:
            image["detail"] = block.detail
        return {"type": "image_url", "image_url": image}
    if isinstance(block, AudioBlock):
        _refuse_remote(block.url, "AudioBlock", where)
        audio = {"data": block.resolve_audio(as_base64=True).read().decode("ascii")}
        if block.format:
            audio["format"] = block.format
        return {"type": "input_audio", "input_audio": audio}
    if isinstance(block, DocumentBlock):
        _refuse_remote(block.url, "DocumentBlock", where)
        return {"type": "file", "file": {"filename": block.title, "file_data": block.inline_url()}}
    raise ValueError(f"{where}: a {type(block).__name__} has no form in an OpenAI chat message")


def _refuse_remote(url: Any, kind: str, where: str) -> None:
    if url is not None and not str(url).lower().startswith("data:"):
        raise ValueError(
            f"{where}: an {kind} by URL: OpenAI chat messages carry audio and files as data "
            "(give the bytes or a path)"
        )


# --- OpenAI -> LlamaIndex ------------------------------------------------------------------
def from_openai(message: Mapping[str, Any]) -> ChatMessage:
    """The LlamaIndex `ChatMessage` of an OpenAI-format message (see the module docstring)."""
    data = {k: copy.deepcopy(v) for k, v in message.items() if k != "turn_id"}
    role = data.pop("role")
    content = data.pop("content", None)
    if isinstance(content, str):
        blocks: list[Any] = [TextBlock(text=content)]
    elif content is None:
        blocks = []
    else:
        blocks = [_block(part) for part in content]
    return ChatMessage(role=MessageRole(role), blocks=blocks, additional_kwargs=data)


def _block(part: Mapping[str, Any]) -> Any:
    kind = part.get("type")
    if kind == "text":
        return TextBlock(text=part["text"])
    if kind == "image_url":
        url = part["image_url"]["url"]
        block = ImageBlock(url=url, detail=part["image_url"].get("detail"))
        if str(block.url) != url:  # pydantic normalised it ("https://a.b" -> "https://a.b/")
            block.url = url
        return block
    if kind == "input_audio":
        audio = part["input_audio"]
        return AudioBlock(audio=audio["data"].encode("ascii"), format=audio.get("format"))
    if kind == "refusal":
        return TextBlock(text=part["refusal"])
    if kind == "file":
        info = part["file"]
        url = info.get("file_data")
        if isinstance(url, str) and url[:5].lower() == "data:":
            head, _, payload = url.partition(",")
            return DocumentBlock(
                data=payload.encode("ascii"),
                title=info.get("filename"),
                document_mimetype=head[5:].split(";")[0] or None,
            )
        name = info.get("filename") or info.get("file_id")
        return TextBlock(text=f"[file: {name}]" if name else "[file]")
    return TextBlock(text=f"[{kind}]")  # as a page shows a part of another type


# --- the memory ----------------------------------------------------------------------------
class OpticalMemoryBuffer(BaseMemory):
    """LlamaIndex memory over the session `session_id` of an `OpticalMemory`.

    `put`/`put_messages` append (one atomic batch each), `get_all` returns every stored turn,
    `get` the optical context for the next model call, `set` replaces the history (keeping
    the stored turns it starts with), `reset` deletes the session. The async variants are the
    base class's (these in a worker thread). `token_limit` caps the positions the context may
    take (default: the memory's window, `mem.window`, the reading model's as its profile says).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    memory: OpticalMemory = Field(exclude=True, description="The OpticalMemory holding the turns.")
    session_id: str = Field(description="The session of the memory this buffer reads and writes.")
    token_limit: int | None = Field(
        default=None, description="Most positions of a context (default: the memory's window)."
    )

    @field_validator("session_id")
    @classmethod
    def _valid_session(cls, value: str) -> str:
        return check_id(value, "session id")

    @classmethod
    def class_name(cls) -> str:
        return "OpticalMemoryBuffer"

    @classmethod
    def from_defaults(
        cls,
        memory: OpticalMemory | None = None,
        session_id: str | None = None,
        chat_history: Sequence[ChatMessage] | None = None,
        token_limit: int | None = None,
        llm: Any = None,
        **memory_options: Any,
    ) -> OpticalMemoryBuffer:
        """A buffer over `memory` (default: `OpticalMemory(**memory_options)`, e.g. `store=`,
        `profile=`) and `session_id` (default: a new one); a non-empty `chat_history` replaces
        the session's history. `llm` is accepted as chat engines pass it, and not used: the
        memory counts as its profile says."""
        if memory is None:
            memory = OpticalMemory(**memory_options)
        elif memory_options:
            raise TypeError(
                "from_defaults() got options for a new OpticalMemory "
                f"({', '.join(memory_options)}) together with memory="
            )
        if session_id is None:
            session_id = uuid.uuid4().hex
        buffer = cls(memory=memory, session_id=session_id, token_limit=token_limit)
        if chat_history:
            buffer.set(list(chat_history))
        return buffer

    # --- reading -----------------------------------------------------------------------
    def get(self, input: str | ChatMessage | None = None, **kwargs: Any) -> list[ChatMessage]:
        """The context for the next model call, as `mem.messages(session_id, ...)` builds it:
        the pinned turns, one user message of labelled page images (`TextBlock` labels, an
        `ImageBlock` per page with its PNG data URL), the recent turns. `input` (the next user
        message, which LlamaIndex's callers send themselves or have put already) has its
        positions reserved and is not included. `initial_token_count` (positions taken by
        the caller's prefix messages) comes off the budget. An empty session gives []."""
        query = input.content if isinstance(input, ChatMessage) else input
        budget = None
        taken = kwargs.get("initial_token_count") or 0
        if self.token_limit is not None or taken:
            window = self.memory.window
            budget = min(window, self.token_limit or window) - taken
            if budget <= 0:
                raise ValueError(
                    f"no positions left for the memory: budget {budget} "
                    f"(token_limit {self.token_limit}, initial_token_count {taken})"
                )
        try:
            # planned with the query's positions but without it: the caller sends it
            messages = self.memory.messages(
                self.session_id, query or None, budget, include_query=False
            )
        except UnknownSessionError:
            return []
        return [from_openai(m) for m in messages]

    def get_all(self) -> list[ChatMessage]:
        """Every stored turn of the session, oldest first ([] for an empty session)."""
        try:
            turns = self.memory.turns(self.session_id)
        except UnknownSessionError:
            return []
        return [from_openai(t.to_message()) for t in turns]

    # --- writing -----------------------------------------------------------------------
    def put(self, message: ChatMessage) -> None:
        """Append one message as a turn, stored durably before this returns."""
        self.put_messages([message])

    def put_messages(self, messages: list[ChatMessage]) -> None:
        """Append messages in one atomic batch: all of them are stored, or none."""
        if messages:
            self.memory.extend(self.session_id, [to_openai(m) for m in messages])

    def set(self, messages: list[ChatMessage]) -> None:
        """Replace the session's history with `messages`. The stored turns it starts with stay
        as they are (their ids, pages and cached images); the rest are deleted and the new
        ones appended. Every message is converted and checked before anything changes."""
        new = [to_openai(m) for m in messages]
        for i, m in enumerate(new):
            self._check(m, f"message {i}")
        try:
            stored = [t.to_message() for t in self.memory.turns(self.session_id)]
        except UnknownSessionError:
            stored = []
        plain = [{k: v for k, v in m.items() if k != "turn_id"} for m in new]
        keep = 0
        while keep < min(len(stored), len(new)) and stored[keep] == plain[keep]:
            keep += 1
        if keep < len(stored):
            self.memory.delete(self.session_id)
            keep = 0
        if new[keep:]:
            self.memory.extend(self.session_id, new[keep:])

    def _check(self, message: Mapping[str, Any], where: str) -> None:
        """What `extend` would refuse of one message, refused before `set` deletes anything."""
        msg = parse_message(message, where)
        if len(msg.text) > self.memory.max_content_chars:
            raise MessageError(
                f"{where}: content has {len(msg.text):,} characters, over the limit of "
                f"{self.memory.max_content_chars:,} (max_content_chars)"
            )
        msg.check_images(where, self.memory.max_image_bytes)

    def reset(self) -> None:
        """Delete the session: its turns, pages and cached images."""
        self.memory.delete(self.session_id)
