import io
import json
import sys

import pytest

from optical_memory.messages import ROLES, Message, MessageError, load_transcript, parse_message


def test_parse_message_accepts_every_role_and_empty_content():
    for role in ROLES:
        assert parse_message({"role": role, "content": ""}) == Message(role, "")


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        ({"content": "x"}, "missing 'role'"),
        ({"role": "robot", "content": "x"}, "unknown role 'robot'"),
        ({"role": "user"}, "missing 'content'"),
        ({"role": "user", "content": None}, "'content' must be a string, got null"),
        ({"role": "user", "content": [{"type": "text"}]}, "content[0]: a 'text' part needs 'text'"),
        ([1, 2], "expected a JSON object, got array"),
    ],
)
def test_parse_message_errors_name_where_and_what(obj, problem):
    with pytest.raises(MessageError, match="line 7") as info:
        parse_message(obj, "line 7")
    assert problem in str(info.value)


def test_message_is_frozen_and_validated():
    m = Message("user", "hi")
    with pytest.raises(AttributeError):
        m.content = "other"
    with pytest.raises(MessageError):
        Message("nobody", "hi")


def test_load_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [
        json.dumps({"role": "user", "content": "héllo 世界"}),
        "",
        json.dumps({"role": "assistant", "content": "ok"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_transcript(path) == [Message("user", "héllo 世界"), Message("assistant", "ok")]


def test_load_json_array(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    )
    assert [m.role for m in load_transcript(path)] == ["system", "user"]


def test_jsonl_error_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"role": "user", "content": "a"}\n{"role": "user", "content": 5}\n')
    with pytest.raises(MessageError, match=r"line 2: 'content' must be a string, got number"):
        load_transcript(path)
    path.write_text('{"role": "user", "content": "a"}\n\n{not json\n')
    with pytest.raises(MessageError, match=r"line 3: not JSON"):
        load_transcript(path)


def test_array_error_names_the_message(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]))
    with pytest.raises(MessageError, match=r"message 1: unknown role 'bot'"):
        load_transcript(path)


def test_invalid_utf8_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"role": "user", "content": "a"}\n{"role": "user", "content": "\xff"}\n')
    with pytest.raises(MessageError, match=r"line 2: invalid UTF-8"):
        load_transcript(path)


def test_missing_file_is_a_message_error(tmp_path):
    with pytest.raises(MessageError, match="cannot read"):
        load_transcript(tmp_path / "absent.jsonl")


def test_stdin(monkeypatch):
    data = json.dumps({"role": "user", "content": "from stdin"}).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert load_transcript("-") == [Message("user", "from stdin")]
