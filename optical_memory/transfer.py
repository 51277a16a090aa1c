"""A session as JSONL and back: one message object per line, with its turn id.

Importing is idempotent by turn id: the same file imported twice stores its
turns once (the store refuses changed content under an existing id).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optical_memory.messages import MessageError, parse_message
from optical_memory.stores import Turn


def write_jsonl(turns: Sequence[Turn], path: str | os.PathLike) -> int:
    """Write turns as JSONL (role, content, turn_id); returns how many."""
    with Path(path).open("w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"role": t.role, "content": t.content, "turn_id": t.turn_id},
                       ensure_ascii=False) + "\n"
            for t in turns
        )
    return len(turns)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The message objects of a JSONL file, each checked; an error names the line."""
    messages = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MessageError(f"{path}: line {number}: not JSON: {exc.msg}") from None
                parse_message(obj, f"{path}: line {number}")
                messages.append(obj)
    return messages
