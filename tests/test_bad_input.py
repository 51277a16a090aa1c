"""Bad input found by a hostile test, on both stores: each is a clear error that names the
message (or the line) and stores nothing; a UTF-8 byte order mark is simply accepted."""

from __future__ import annotations

import base64
import io
import json
import sqlite3

import pytest
from PIL import Image

from optical_memory.apps.cli import main
from optical_memory.memory import OpticalMemory
from optical_memory.messages import MessageError
from optical_memory.stores import StoreError, TurnConflictError
from optical_memory.stores.base import InvalidTurnError, NewTurn
from optical_memory.stores.sqlite import SQLiteStore

OK = {"role": "user", "content": "fine"}


@pytest.fixture
def mem(store) -> OpticalMemory:
    return OpticalMemory(store)


def image_url(fmt: str = "PNG", size: tuple[int, int] = (64, 48), mime: str | None = None) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format=fmt)
    mime = mime or f"image/{fmt.lower()}"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def with_image(url: str) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": "see"},
            {"type": "image_url", "image_url": {"url": url}},
        ],
    }


def refused(mem: OpticalMemory, messages: list, match: str, error=MessageError, **kw) -> str:
    """extend fails with `error` matching `match`, and the session holds nothing afterwards."""
    with pytest.raises(error, match=match) as info:
        mem.extend("s", messages, **kw)
    assert mem.store.turn_count("s") == 0
    assert mem.sessions() == []
    return str(info.value)


# --------------------------------------------------------------------------- lone surrogates
@pytest.mark.parametrize(
    ("message", "where"),
    [
        (
            {"role": "user", "content": "broken \ud83d emoji"},
            "content contains a lone surrogate U+D83D",
        ),
        (
            {"role": "user", "content": [{"type": "text", "text": "x\udc00"}]},
            "content[0].text contains a lone surrogate U+DC00",
        ),
        ({"role": "user", "content": "x", "name": "\ud800"}, "name contains a lone surrogate"),
        ({"role": "user", "content": "x", "meta": {"\ud800": 1}}, "field name"),
        ({"role": "user", "content": "x", "turn_id": "id-\ud800"}, "'turn_id' contains a lone"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_the_message(mem, message, where):
    text = refused(mem, [OK, message], r"^message 1: ")
    assert where in text and "UnicodeEncodeError" not in text


def test_a_lone_surrogate_in_a_turn_id_is_refused(mem):
    refused(
        mem,
        [OK, OK],
        r"message 1: turn id 'b\\ud800' contains a lone surrogate",
        turn_ids=["a", "b\ud800"],
    )
    with pytest.raises(MessageError, match="turn: turn id .* lone surrogate"):
        mem.append("s", "user", "hi", turn_id="\udfff")
    assert mem.store.turn_count("s") == 0


def test_the_store_itself_refuses_a_lone_surrogate(store):
    with pytest.raises(InvalidTurnError, match=r"turn 1 of the batch .* content contains a lone"):
        store.append("s", [NewTurn("a", "user", "ok"), NewTurn("b", "user", "\ud800")])
    with pytest.raises(InvalidTurnError, match=r"turn 0 of the batch .* turn id contains a lone"):
        store.append("s", [NewTurn("\ud800", "user", "ok")])
    assert store.turn_count("s") == 0


def test_a_lone_surrogate_in_an_imported_file_names_the_line(mem, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"role": "user", "content": "a"}\n{"role": "user", "content": "\\ud83d"}\n')
    with pytest.raises(MessageError, match=r"t.jsonl: line 2: content contains a lone surrogate"):
        mem.import_jsonl("s", path)
    assert mem.store.turn_count("s") == 0


# --------------------------------------------------------------------------- one id twice
def test_one_turn_id_twice_in_a_batch_with_different_content(mem):
    messages = [
        {"role": "user", "content": "one", "turn_id": "m1"},
        {"role": "user", "content": "two", "turn_id": "m2"},
        {"role": "user", "content": "changed", "turn_id": "m1"},
    ]
    text = refused(
        mem,
        messages,
        r"message 2: turn id 'm1' is also the id of message 0",
        error=TurnConflictError,
    )
    assert "already stored" not in text


def test_one_turn_id_twice_in_a_store_batch_with_different_content(store):
    with pytest.raises(TurnConflictError) as info:
        store.append("s", [NewTurn("x", "user", "a"), NewTurn("x", "user", "b")])
    assert "twice in one batch" in str(info.value) and "turns 0 and 1" in str(info.value)
    assert "already stored" not in str(info.value)
    assert store.turn_count("s") == 0
    # the same message under another shape of JSON is a different turn too
    with pytest.raises(TurnConflictError, match="twice in one batch"):
        store.append(
            "s",
            [
                NewTurn("y", "user", "a"),
                NewTurn("y", "user", "a", '{"role":"user","content":"a","name":"n"}'),
            ],
        )
    assert store.turn_count("s") == 0


def test_one_turn_id_twice_in_a_batch_with_the_same_content_is_stored_once(mem, store):
    same = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    turns = mem.extend("s", [same, OK, same], turn_ids=["t", "u", "t"])
    assert [t.index for t in turns] == [0, 1, 0]
    assert turns[0] == turns[2] and mem.store.turn_count("s") == 2
    # and one already stored, given again twice in a later batch
    again = mem.extend("s", [same, same], turn_ids=["t", "t"])
    assert [t.index for t in again] == [0, 0] and mem.store.turn_count("s") == 2
    with pytest.raises(TurnConflictError, match="already stored"):
        mem.extend("s", [OK], turn_ids=["t"])


# --------------------------------------------------------------------------- imported files
def test_a_byte_order_mark_is_accepted(mem, tmp_path):
    path = tmp_path / "bom.jsonl"
    body = "\n".join(json.dumps({**OK, "turn_id": f"b{i}"}) for i in range(3)) + "\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert len(mem.import_jsonl("s", path)) == 3
    assert [t.turn_id for t in mem.turns("s")] == ["b0", "b1", "b2"]


def test_invalid_utf8_in_an_imported_file_names_the_line(mem, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"role": "user", "content": "a"}\n{"role": "user", "content": "b"}\n'
        b'{"role": "user", "content": "caf\xe9"}\n'
    )
    with pytest.raises(MessageError, match=r"bad.jsonl: line 3: invalid UTF-8 \(byte 0xe9"):
        mem.import_jsonl("s", path)
    assert mem.store.turn_count("s") == 0


def test_ingest_names_the_line_of_invalid_utf8_and_accepts_a_bom(tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"role": "user", "content": "a"}\n{"role": "user", "content": "\xff"}\n')
    with pytest.raises(SystemExit) as info:
        main(["ingest", "--store", store, "s", str(bad)])
    assert "line 2: invalid UTF-8" in str(info.value.code)
    good = tmp_path / "good.json"
    good.write_bytes(b"\xef\xbb\xbf" + json.dumps([OK, OK]).encode())
    assert main(["ingest", "--store", store, "s", str(good)]) == 0
    assert "2 turns appended" in capsys.readouterr().out


# --------------------------------------------------------------------------- images
def test_an_image_over_the_size_limit_is_refused(store):
    mem = OpticalMemory(store, max_image_bytes=200)
    text = refused(mem, [OK, with_image(image_url(size=(300, 300)))], r"message 1: content\[1\]")
    assert "over the limit of 200 (max_image_bytes)" in text


def test_a_decompression_bomb_is_refused(mem, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    text = refused(mem, [with_image(image_url(size=(100, 100)))], r"message 0: content\[1\]")
    assert "10,000 pixels" in text and "decompression-bomb" in text


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (image_url()[:-40], "does not decode"),  # truncated
        ("data:image/png;base64,not base64!", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"just some text").decode(), "not an image"),
        (image_url("BMP", mime="image/png"), "is BMP, not PNG, JPEG, WebP or GIF"),
    ],
)
def test_an_image_that_does_not_decode_is_refused(mem, url, problem):
    assert problem in refused(mem, [OK, with_image(url)], r"message 1: content\[1\]")


def test_every_image_format_openai_takes_is_accepted(mem):
    urls = [image_url("PNG"), image_url("JPEG"), image_url("WEBP"), image_url("GIF")]
    mem.extend("s", [with_image(u) for u in urls])
    assert [t.to_message()["content"][1]["image_url"]["url"] for t in mem.turns("s")] == urls


# --------------------------------------------------------------------------- a full disk
def test_a_full_disk_is_a_store_error_naming_the_cause(tmp_path):
    store = SQLiteStore(tmp_path / "small.sqlite3")
    mem = OpticalMemory(store)
    mem.extend("s", [OK])
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # a disk with 8 KiB left
    big = [{"role": "user", "content": f"{i} " + "x" * 3000} for i in range(20)]
    with pytest.raises(StoreError, match="full") as info:
        mem.extend("s", big)
    assert not isinstance(info.value, sqlite3.Error)
    assert "nothing of this write was stored" in str(info.value)
    assert store.turn_count("s") == 1
    store._db.execute("PRAGMA max_page_count = 1073741823")  # space again: it works
    assert len(mem.extend("s", big)) == 20 and store.turn_count("s") == 21
    mem.close()


def test_render_names_the_line_of_an_image_that_does_not_decode(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(OK) + "\n" + json.dumps(with_image(image_url()[:-40])) + "\n")
    assert main(["render", str(path), "--out", str(tmp_path / "pages")]) == 1
    assert "t.jsonl: line 2: content[1]: the image does not decode" in capsys.readouterr().err
    path.write_text(json.dumps(OK) + "\n" + json.dumps(with_image(image_url())) + "\n")
    assert main(["render", str(path), "--out", str(tmp_path / "pages")]) == 0
    manifest = json.loads((tmp_path / "pages" / "pages.json").read_text())
    assert len(manifest["pages"]) == 1


def test_inline_audio_or_file_data_over_the_limit_is_refused(store):
    mem = OpticalMemory(store, max_image_bytes=300)
    audio = {"type": "input_audio", "input_audio": {"data": "QUFB" * 200, "format": "wav"}}
    text = refused(mem, [OK, {"role": "user", "content": [audio]}], r"message 1: content\[0\]")
    assert "input_audio data" in text and "(max_image_bytes)" in text
    small = {"type": "file", "file": {"filename": "a.txt", "file_data": "QUFB" * 10}}
    assert mem.extend("s", [{"role": "user", "content": [small]}])[0].content == "[file: a.txt]"
