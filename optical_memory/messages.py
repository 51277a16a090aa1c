"""Chat messages in the OpenAI format, and transcripts of them.

A transcript is a JSONL file (one message object per line), a JSON array of
message objects, or "-" for standard input. Every error names where the
problem is (line number for JSONL, array index for JSON arrays) and what it is.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")


class MessageError(ValueError):
    """A message or transcript that cannot be used; the text says where and why."""


@dataclass(frozen=True)
class Message:
    """One chat turn: a role from ROLES and its text content."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise MessageError(f"unknown role {self.role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise MessageError(f"content must be a string, got {type(self.content).__name__}")

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def parse_message(obj: Any, where: str = "message") -> Message:
    """A Message from a decoded JSON object; `where` prefixes any error (e.g. "line 3")."""
    if isinstance(obj, Message):
        return obj
    if not isinstance(obj, Mapping):
        raise MessageError(f"{where}: expected a JSON object, got {_json_type(obj)}")
    if "role" not in obj:
        raise MessageError(f"{where}: missing 'role'")
    role = obj["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise MessageError(f"{where}: unknown role {role!r}; valid roles: {', '.join(ROLES)}")
    if "content" not in obj:
        raise MessageError(f"{where}: missing 'content'")
    content = obj["content"]
    if not isinstance(content, str):
        raise MessageError(f"{where}: 'content' must be a string, got {_json_type(content)}")
    return Message(role, content)


def load_transcript(source: str | Path) -> list[Message]:
    """Messages from a JSONL file, a JSON array file, or "-" (standard input).

    The format is detected from the first non-blank character: "[" means a JSON
    array, anything else JSONL. Invalid UTF-8 is an error, not replaced.
    """
    name = "<stdin>" if str(source) == "-" else str(source)
    try:
        raw = sys.stdin.buffer.read() if str(source) == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise MessageError(f"{name}: cannot read: {exc.strerror or exc}") from None
    text = _decode(raw, name)
    if text.lstrip().startswith("["):
        return _parse_array(text, name)
    return _parse_jsonl(text, name)


def _decode(raw: bytes, name: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise MessageError(
            f"{name}: line {line}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    return text.removeprefix("\ufeff")


def _parse_jsonl(text: str, name: str) -> list[Message]:
    messages = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}: line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MessageError(f"{where}: not JSON: {exc.msg} (column {exc.colno})") from None
        messages.append(parse_message(obj, where))
    return messages


def _parse_array(text: str, name: str) -> list[Message]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MessageError(
            f"{name}: line {exc.lineno}: not JSON: {exc.msg} (column {exc.colno})"
        ) from None
    if not isinstance(data, list):
        raise MessageError(f"{name}: expected a JSON array of messages, got {_json_type(data)}")
    return [parse_message(obj, f"{name}: message {i}") for i, obj in enumerate(data)]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__
