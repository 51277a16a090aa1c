"""A session as JSONL and back: one message object per line, with its turn id.

Each line is the message exactly as it was given, as stored (`dump_json`'s style:
keys in the given order, UTF-8, compact), with "turn_id" added as its last field.
So the line of a message given without a turn id is `dump_json({**message,
"turn_id": id})`, and export, import into another session and export again give
the same bytes. "turn_id" is an instruction, not part of the message: importing
drops it from the message and uses it as the turn's id.

Importing is idempotent by turn id: the same file imported twice stores its
turns once (the store refuses changed content under an existing id).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from optical_memory.messages import Message, dump_json, load_transcript
from optical_memory.stores import Turn


def export_line(turn: Turn) -> str:
    """The JSONL line of a turn: its stored message with "turn_id" appended, newline included."""
    message = turn.message_json  # an object with at least "role": "{...}"
    return f'{message[:-1]},"turn_id":{dump_json(turn.turn_id)}}}\n'


def write_jsonl(turns: Sequence[Turn], path: str | os.PathLike) -> int:
    """Write turns as JSONL (each message as given, plus its turn_id); returns how many."""
    with Path(path).open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(export_line(t) for t in turns)
    return len(turns)


def read_jsonl(path: str | os.PathLike) -> list[Message]:
    """The messages of a JSONL file (or a JSON array), each checked, each with the turn id
    its line gives; a UTF-8 byte order mark is skipped; an error (invalid UTF-8 included)
    names the line."""
    return load_transcript(path)
