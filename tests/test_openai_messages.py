"""The OpenAI message format, lossless: real-looking logs with tool calls, content parts, names,
tool results, the legacy function role and data-URL images go in through `extend`, `ingest` and
`import_jsonl` on both stores and come back out byte for byte; pages draw tool calls as code
and images as pictures."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import uuid

import numpy as np
import pytest
from PIL import Image

from optical_memory.apps.cli import main
from optical_memory.memory import OpticalMemory
from optical_memory.messages import (
    IMAGE_SLOT,
    Message,
    MessageError,
    chat_messages,
    dump_json,
    load_transcript,
    parse_message,
    render_text,
)
from optical_memory.policy import Policy
from optical_memory.stores.base import NewTurn
from optical_memory.stores.redis import RedisStore
from optical_memory.stores.sqlite import SQLiteStore
from renderers import RenderConfig, Renderer


def png_url(seed: int, size: tuple[int, int] = (120, 80), fmt: str = "PNG") -> str:
    """A data URL of a small image with a pattern of its own (dark enough to see on paper)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 160, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def real_log(image: str | None = None) -> list[dict]:
    """A chat as an OpenAI client logs it: SDK dumps with nulls, parts, tools, names, extras."""
    return [
        {"role": "system", "content": "You are a travel assistant. Réponds en français si besoin."},
        {"role": "developer", "content": [{"type": "text", "text": "Use tools for weather."}]},
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "What's the weather in Paris? Here is my screenshot:"},
                {"type": "image_url", "image_url": {"url": image or png_url(1), "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/map.png"}},
            ],
        },
        {
            "content": None,
            "refusal": None,
            "role": "assistant",
            "annotations": [],
            "audio": None,
            "function_call": None,
            "tool_calls": [
                {
                    "id": "call_Paris1",
                    "function": {
                        "arguments": '{"city": "Paris", "unit": "c"}',
                        "name": "get_weather",
                    },
                    "type": "function",
                },
                {
                    "id": "call_Time2",
                    "function": {"arguments": "{}", "name": "get_time"},
                    "type": "function",
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_Paris1", "content": '{"temp": 21, "sky": "clear"}'},
        {
            "role": "tool",
            "tool_call_id": "call_Time2",
            "content": [{"type": "text", "text": "14:05 CET"}],
        },
        {
            "role": "assistant",
            "content": "Il fait 21 °C et beau à Paris\u2028(14:05). 晴れ。",
            "x_meta": {"latency_ms": 812, "score": 0.25, "tags": ["a", "b"]},
        },
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "lookup", "arguments": '{"q": "x"}'},
        },
        {"role": "function", "name": "lookup", "content": "found 3 results"},
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "file", "file": {"filename": "itinerary.pdf", "file_data": "JVBERi0="}},
                {"type": "hologram", "payload": {"x": 1}},
            ],
        },
        {"role": "assistant", "name": "planner", "content": "Merci !"},
    ]


@pytest.fixture
def store_url(store_kind, tmp_path, request):
    """A store URL of the parametrised kind for the CLI (Redis: db 15, the CLI's key prefix)."""
    if store_kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'cli.sqlite3'}"
        return
    request.getfixturevalue("redis_prefix")  # skips without a server
    url = request.getfixturevalue("redis_url")
    yield url
    store = RedisStore(url)
    for sid in store.sessions():
        if sid.startswith("omtest-"):
            store.delete(sid)
    store.close()


def lines(path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


# --------------------------------------------------------------------------- messages
def test_parse_keeps_every_field_in_order_and_takes_turn_id_out():
    given = {"content": "hi", "turn_id": "t1", "role": "user", "name": "bob", "x": [1, 2.5, None]}
    m = parse_message(given)
    assert m.turn_id == "t1"
    assert m.to_dict() == {"content": "hi", "role": "user", "name": "bob", "x": [1, 2.5, None]}
    assert m.json == '{"content":"hi","role":"user","name":"bob","x":[1,2.5,null]}'
    assert list(m.to_dict()) == ["content", "role", "name", "x"]
    assert m != Message("user", "hi")  # the name and the extra field count
    assert parse_message({"role": "user", "content": "hi", "turn_id": "z"}) == Message("user", "hi")


def test_every_message_of_a_real_log_parses_and_renders():
    log = real_log()
    texts = [render_text(m) for m in log]
    assert texts[0] == log[0]["content"]  # a plain message renders as its content
    assert texts[2] == (
        "What's the weather in Paris? Here is my screenshot:\n"
        f"{IMAGE_SLOT}\n[image: https://example.com/map.png]"
    )
    assert texts[3] == ('```\nget_weather({"city": "Paris", "unit": "c"})\nget_time({})\n```')
    assert texts[5] == "14:05 CET"
    assert texts[7] == '```\nlookup({"q": "x"})\n```'
    assert texts[9] == "[audio: wav]\n[file: itinerary.pdf]\n[hologram]"
    labels = [parse_message(m).label_detail for m in log]
    assert labels[2] == "alice" and labels[4] == "call_Paris1" and labels[8] == "lookup"
    assert labels[10] == "planner" and labels[0] == ""
    assert parse_message(log[2]).image_slots == (len(log[2]["content"][0]["text"]) + 1,)


def test_chat_messages_keep_answered_tool_calls_and_turn_the_rest_into_text():
    log = real_log()
    sent = chat_messages(log[3:])
    assert sent[0]["tool_calls"] == log[3]["tool_calls"] and "annotations" not in sent[0]
    assert sent[1] == {"role": "tool", "tool_call_id": "call_Paris1", "content": log[4]["content"]}
    assert sent[3] == {"role": "assistant", "content": log[6]["content"]}  # x_meta left out
    assert sent[4] == {"role": "assistant", "content": '```\nlookup({"q": "x"})\n```'}
    assert sent[5] == {"role": "user", "content": "[function lookup] found 3 results"}
    # the call paged out: its results become text
    orphan = chat_messages(log[4:6])
    assert orphan[0] == {
        "role": "user",
        "content": '[tool call_Paris1] {"temp": 21, "sky": "clear"}',
    }
    # calls without their answers: text too
    assert chat_messages(log[3:5])[0]["role"] == "assistant"
    assert "tool_calls" not in chat_messages(log[3:5])[0]


def test_load_transcript_reads_parts_tools_bom_and_arrays(tmp_path):
    log = real_log()
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_bytes(
        b"\xef\xbb\xbf" + "\n".join(json.dumps(m, ensure_ascii=False) for m in log).encode() + b"\n"
    )
    assert [m.to_dict() for m in load_transcript(jsonl)] == log  # U+2028 inside a line is fine
    array = tmp_path / "log.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(log, indent=2).encode())
    assert [m.to_dict() for m in load_transcript(array)] == log


# --------------------------------------------------------------------------- the stores
def test_extend_stores_each_message_exactly(store):
    mem = OpticalMemory(store)
    log = real_log()
    stored = mem.extend("trip", log)
    assert [t.message_json for t in stored] == [dump_json(m) for m in log]
    turns = mem.turns("trip")
    assert [t.to_message() for t in turns] == log
    assert [t.message_json for t in turns] == [dump_json(m) for m in log]
    assert [list(t.to_message()) for t in turns] == [list(m) for m in log]  # key order
    assert turns[3].content.startswith("```\nget_weather(")  # the render text


def test_append_takes_any_message_shape(store):
    mem = OpticalMemory(store)
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    a = mem.append("s", "assistant", None, turn_id="a1", tool_calls=call)
    b = mem.append("s", "tool", "42", tool_call_id="c1")
    again = mem.append("s", "assistant", None, turn_id="a1", tool_calls=call)
    assert again == a and b.index == 1
    assert a.to_message() == {"role": "assistant", "content": None, "tool_calls": call}


def test_export_import_export_is_byte_identical(store, tmp_path):
    mem = OpticalMemory(store)
    log = real_log()
    ids = [f"trip-{i}" for i in range(len(log))]
    mem.extend("trip", log, turn_ids=ids)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert mem.export_jsonl("trip", first) == len(log)
    for line, message, tid in zip(lines(first), log, ids):
        assert line == dump_json({**message, "turn_id": tid}).encode("utf-8")
    mem.import_jsonl("copy", first)
    mem.import_jsonl("copy", first)  # idempotent by turn id
    mem.export_jsonl("copy", second)
    assert second.read_bytes() == first.read_bytes()
    assert [t.to_message() for t in mem.turns("copy")] == log


def test_round_trip_through_a_reopened_store(store_factory):
    log = real_log()
    mem = OpticalMemory(store_factory())
    mem.extend("trip", log)
    reopened = OpticalMemory(store_factory())
    assert [t.message_json for t in reopened.turns("trip")] == [dump_json(m) for m in log]


def test_plain_messages_are_stored_as_before(store):
    """A plain message keeps no second copy (Redis: no "message" in the record; SQLite: NULL)."""
    store.append(
        "s",
        [NewTurn("p", "user", "plain"), NewTurn("q", "user", "x", '{"content":"x","role":"user"}')],
    )
    (t0, t1) = store.turns("s")
    assert t0.message_json == '{"role":"user","content":"plain"}'
    assert t1.message_json == '{"content":"x","role":"user"}'  # key order is kept
    if isinstance(store, RedisStore):
        raw = store._r.lrange(store._key("s", "turns"), 0, -1)
        assert "message" not in json.loads(raw[0]) and "message" in json.loads(raw[1])
    else:
        rows = store._db.execute("SELECT message FROM turns ORDER BY idx").fetchall()
        assert rows == [(None,), ('{"content":"x","role":"user"}',)]
    # a retry differing only in key order is the same turn
    assert store.append("s", [NewTurn("q", "user", "x")])[0].index == 1


def test_a_file_of_an_older_version_is_migrated(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE turns (
            sid TEXT NOT NULL, idx INTEGER NOT NULL, turn_id TEXT NOT NULL, role TEXT NOT NULL,
            content TEXT NOT NULL, created REAL NOT NULL,
            PRIMARY KEY (sid, idx), UNIQUE (sid, turn_id)
        ) WITHOUT ROWID;
        INSERT INTO turns VALUES ('s', 0, 'old-1', 'user', 'from before', 1.0);
        """
    )
    db.commit()
    db.close()
    mem = OpticalMemory(SQLiteStore(path))
    (old,) = mem.turns("s")
    assert old.to_message() == {"role": "user", "content": "from before"}
    assert mem.append("s", "user", "from before", turn_id="old-1").index == 0  # a retry
    new = mem.append("s", "assistant", None, tool_calls=real_log()[3]["tool_calls"])
    assert mem.turns("s")[1].message_json == new.message_json
    mem.close()
    again = SQLiteStore(path)  # opening a migrated file again changes nothing
    assert [t.message_json for t in again.turns("s")] == [old.message_json, new.message_json]
    again.close()


def test_ingest_cli_stores_the_log_exactly(store_url, tmp_path, capsys):
    log = real_log()
    session = f"omtest-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "log.jsonl"
    path.write_text(
        "\n".join(json.dumps({**m, "turn_id": f"m{i}"}) for i, m in enumerate(log)) + "\n",
        encoding="utf-8",
    )
    assert main(["ingest", "--store", store_url, session, str(path)]) == 0
    assert main(["ingest", "--store", store_url, session, str(path)]) == 0  # idempotent
    capsys.readouterr()
    mem = OpticalMemory(store_url)
    try:
        turns = mem.turns(session)
        assert [t.to_message() for t in turns] == log
        assert [t.turn_id for t in turns] == [f"m{i}" for i in range(len(log))]
        out = tmp_path / "out.jsonl"
        mem.export_jsonl(session, out)
        assert lines(out) == [
            dump_json({**m, "turn_id": f"m{i}"}).encode() for i, m in enumerate(log)
        ]
    finally:
        mem.delete(session)
        mem.close()


# --------------------------------------------------------------------------- pages
@pytest.fixture(scope="module")
def base() -> Renderer:
    return Renderer(RenderConfig.for_mode("base"))


def ink(image: Image.Image) -> np.ndarray:
    return 255 - np.asarray(image.convert("L"), dtype=np.int32)


def test_a_page_draws_the_image_of_a_turn(base):
    log = real_log(png_url(1, (200, 100)))
    page = base.paginate(log[:3])[0]
    (placed,) = page.images
    assert (placed.width, placed.height) == (200, 100)  # small images are not scaled up
    drawn = np.asarray(base.render(page), dtype=np.int32)
    box = drawn[placed.y : placed.y + placed.height, placed.x : placed.x + placed.width]
    raw = base64.b64decode(png_url(1, (200, 100)).split(",")[1])
    expect = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int32)
    assert np.abs(box - expect).max() == 0  # at 1x the picture is drawn pixel for pixel
    assert 255 - box.mean() > 60  # not blank paper
    other = base.paginate(real_log(png_url(2, (200, 100)))[:3])[0]
    assert other.content_hash != page.content_hash  # a different picture, a different page
    assert base.paginate(log[:3])[0].content_hash == page.content_hash
    # the label shows the name; the image is no glyph of the page's lines
    text = [t for _, t in base.page_lines(log[:3], page)]
    assert "USER (alice)" in text and IMAGE_SLOT not in "".join(text)


def test_tool_calls_and_tool_results_are_on_the_page(base):
    log = real_log()
    pages = base.paginate(log)
    text = [t for p in pages for _, t in base.page_lines(log, p)]
    assert 'get_weather({"city": "Paris", "unit": "c"})' in text
    assert "TOOL (call_Paris1)" in text and "FUNCTION (lookup)" in text
    assert "[image: https://example.com/map.png]" in text
    assert "[audio: wav]" in text and "[file: itinerary.pdf]" in text
    assert "ASSISTANT (planner)" in text


def test_wide_and_tall_images_are_scaled_into_one_page(base):
    cfg = base.config
    wide = parse_message(
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": png_url(3, (3000, 300))}}],
        }
    )
    tall = parse_message(
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": png_url(4, (300, 5000))}}],
        }
    )
    (page,) = base.paginate([wide])
    assert page.images[0].width == cfg.text_width and page.images[0].height == round(
        300 * cfg.text_width / 3000
    )
    (page,) = base.paginate([tall])
    box = page.images[0]
    assert box.height <= (cfg.lines_per_page - 1) * cfg.line_height
    assert box.y + box.height <= cfg.height - cfg.margin
    assert abs(box.width / box.height - 300 / 5000) < 0.01
    assert ink(base.render(page))[box.y : box.y + box.height, box.x : box.x + box.width].mean() > 60


def test_an_image_that_does_not_fit_moves_to_the_next_page(base):
    cfg = base.config
    filler = {
        "role": "user",
        "content": "\n".join(f"line {i}" for i in range(cfg.lines_per_page - 6)),
    }
    picture = {
        "role": "user",
        "content": [
            {"type": "text", "text": "before"},
            {"type": "image_url", "image_url": {"url": png_url(5, (400, 300))}},
            {"type": "text", "text": "after"},
        ],
    }
    messages = [filler, picture, {"role": "assistant", "content": "ok"}]
    pages = base.paginate(messages)
    assert len(pages) == 2 and pages[0].full and not pages[0].images
    assert len(pages[1].images) == 1
    slot = parse_message(picture).image_slots[0]
    assert pages[0].spans[-1].end == slot and pages[1].spans[0].start == slot
    assert pages[0].next_start == (1, slot)
    # greedy and sealed: the first page does not change with what follows, and pagination
    # resumed at the boundary gives the same second page
    assert base.paginate(messages[:2])[0].content_hash == pages[0].content_hash
    resumed = base.paginate(messages, start=pages[0].next_start)
    assert [p.content_hash for p in resumed] == [p.content_hash for p in pages[1:]]
    assert base.render(resumed[0]).tobytes() == base.render(pages[1]).tobytes()


def test_plain_pages_are_unchanged_by_the_message_format(base):
    """A plain message lays out exactly as a Message, a dict, or a stored turn's message."""
    messages = [
        {"role": ("user", "assistant")[i % 2], "content": f"turn {i} " * 40} for i in range(30)
    ]
    as_dicts = base.paginate(messages)
    as_messages = base.paginate([Message(m["role"], m["content"]) for m in messages])
    assert [p.content_hash for p in as_dicts] == [p.content_hash for p in as_messages]


def test_memory_pages_keep_the_picture(store):
    mem = OpticalMemory(
        store, render=RenderConfig.for_mode("tiny"), policy=Policy(recent_turns=2, recent_tokens=50)
    )
    image = png_url(6, (160, 120))
    log = real_log(image)
    mem.extend("trip", log + [{"role": "user", "content": f"later {i} " * 30} for i in range(12)])
    pages = mem.pages("trip")
    holding = [r for r in pages if r.first_turn <= 2 <= r.last_turn]
    drawn = [mem.page_image("trip", r) for r in holding]
    laid = [mem.pager.renderer.paginate([t.to_message() for t in mem.turns("trip")])]
    boxes = [box for p in laid[0] for box in p.images]
    assert len(boxes) == 1
    box = boxes[0]
    assert any(
        ink(img)[box.y : box.y + box.height, box.x : box.x + box.width].mean() > 60 for img in drawn
    )
    other = OpticalMemory(
        store, render=RenderConfig.for_mode("tiny"), policy=Policy(recent_turns=2, recent_tokens=50)
    )
    other.extend(
        "trip2",
        real_log(png_url(7, (160, 120)))
        + [{"role": "user", "content": f"later {i} " * 30} for i in range(12)],
    )
    hashes = {r.content_hash for r in holding}
    other_hashes = {
        r.content_hash for r in other.pages("trip2") if r.first_turn <= 2 <= r.last_turn
    }
    assert hashes.isdisjoint(other_hashes)


def test_unsupported_shapes_are_refused_with_where_and_what():
    bad = [
        ({"role": "user", "content": "x", "tool_calls": []}, "'tool_calls' belong to assistant"),
        ({"role": "assistant", "content": None, "tool_calls": {}}, "'tool_calls' must be an array"),
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "f"}}],
            },
            "tool_calls[0]: function: 'arguments' must be a string",
        ),
        ({"role": "assistant", "content": None}, "'content' must be a string, got null"),
        ({"role": "user", "content": [{"text": "x"}]}, "content[0]: a content part needs a 'type'"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": "https://x"}]},
            "content[0]: an 'image_url' part",
        ),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]},
            "http(s) URL",
        ),
        (
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA=="}}
                ],
            },
            "PNG, JPEG, WebP or GIF",
        ),
        (
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}],
            },
            "must be base64",
        ),
        ({"role": "tool", "content": "x", "tool_call_id": 5}, "'tool_call_id' must be a string"),
        ({"role": "user", "content": "x", "name": 5}, "'name' must be a string"),
        ({"role": "user", "content": "x", "turn_id": 5}, "'turn_id' must be a string"),
        ({"role": "user", "content": float("nan")}, "got number"),
        ({"role": "user", "content": "x", "extra": float("nan")}, "not JSON"),
    ]
    for obj, problem in bad:
        with pytest.raises(MessageError) as info:
            parse_message(obj, "line 4")
        assert str(info.value).startswith("line 4: ") and problem in str(info.value), obj


def test_recent_turns_reach_a_chat_model_as_they_were_given(tmp_path):
    call = {
        "id": "call_9",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Porto"}'},
    }
    tail = [
        {"role": "user", "content": "Weather in Porto?", "name": "ana"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_9", "content": "21 C, sunny"},
        {"role": "assistant", "content": [{"type": "text", "text": "21 C and sunny."}]},
    ]
    mem = OpticalMemory(tmp_path / "m.sqlite3", profile="gpt-4o")
    mem.extend("s", [{"role": "system", "content": "Be brief."}, *tail])
    messages = mem.messages("s", "And tomorrow?")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1:-1] == tail
    assert messages[-1] == {"role": "user", "content": "And tomorrow?"}
