"""The MCP server (`optical-memory mcp`) as MCP clients see it: the real server process, driven
by the MCP SDK's own client over stdio and over streamable HTTP.

Over stdio: the tools and resource templates listed, a 200-turn conversation remembered (a
retry with its turn ids stores nothing twice), recalled for a query within a budget the history
does not fit as text (the page images are PNGs, each after its label, then the turns the query
recalls verbatim; the plan is JSON and agrees with them), a page read as a resource (the
full canvas and a tier's geometry), messages with tool calls kept field for field, errors as
tool errors naming the problem, forget and sessions. Over HTTP: a server on a free loopback
port, a tool call, then the process stopped by its pid.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp")

import anyio  # after the skip: anyio comes with mcp
from mcp import ClientSession, StdioServerParameters, stdio_client
from PIL import Image

from optical_memory.conversation import build_conversation
from optical_memory.integrations.mcp import page_uri
from optical_memory.memory import OpticalMemory
from optical_memory.prompt import RECALLED_INTRO

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
TIMEOUT_S = 60


def _tiny_png() -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


SKY = _tiny_png()
TOOL_CHAT = [
    {"role": "system", "content": "You can look up the weather.", "turn_id": "w0"},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Weather in Rotterdam? The sky now:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + SKY}},
        ],
        "name": "priya",
        "turn_id": "w1",
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Rotterdam"}'},
            }
        ],
        "turn_id": "w2",
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 11}', "turn_id": "w3"},
    {"role": "assistant", "content": "11 °C in Rotterdam, Всё хорошо.", "turn_id": "w4"},
]


def _server_env() -> dict[str, str]:
    """What the server process needs of this one's environment (the SDK passes only a few)."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _text(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def _png(data: str) -> Image.Image:
    raw = base64.b64decode(data, validate=True)
    assert raw.startswith(PNG)
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


async def _stdio_checks(store: Path, log: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "optical_memory", "mcp", "--store", str(store)],
        env=_server_env(),
        cwd=str(ROOT),
    )
    with log.open("w") as errlog, anyio.fail_after(TIMEOUT_S):
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write, read_timeout_seconds=TIMEOUT_S) as session,
        ):
            await session.initialize()
            await _check_tools_and_recall(session, store)


async def _check_tools_and_recall(session: ClientSession, store: Path) -> None:
    tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == {"remember", "recall", "search", "forget", "sessions"}
    assert tools["recall"].input_schema["properties"]["format"]["enum"] == ["messages", "plan"]
    assert tools["remember"].input_schema["required"] == ["session_id", "messages"]
    templates = {
        t.uri_template for t in (await session.list_resource_templates()).resource_templates
    }
    assert "optical-memory://sessions/{session_id}/pages/{page}.png{?tier}" in templates

    # remember: 200 turns in one batch; a retry of some of them (same turn ids) stores nothing
    chat = [{**m, "turn_id": f"c{i}"} for i, m in enumerate(build_conversation(200))]
    result = await session.call_tool("remember", {"session_id": "chat/42", "messages": chat})
    assert not result.is_error, _text(result)
    assert result.structured_content == {
        "session_id": "chat/42",
        "stored": 200,
        "already_stored": 0,
        "turns": 200,
    }
    result = await session.call_tool("remember", {"session_id": "chat/42", "messages": chat[-3:]})
    assert result.structured_content["stored"] == 0
    assert result.structured_content["already_stored"] == 3

    # recall: the context for a query, pages as PNG image content after their labels; a
    # history that fits the window goes as text, so a budget that 200 turns do not fit
    query = "What is the marketing budget?"
    budget = 4000
    result = await session.call_tool(
        "recall", {"session_id": "chat/42", "query": query, "budget": budget}
    )
    assert not result.is_error, _text(result)
    blocks = result.content
    images = [b for b in blocks if b.type == "image"]
    assert images and all(b.mime_type == "image/png" for b in images)
    for i, block in enumerate(blocks):
        if block.type == "image":
            assert _png(block.data).size[0] >= 512
            assert blocks[i - 1].type == "text" and "turns " in blocks[i - 1].text.splitlines()[-1]
    assert blocks[0].text.startswith("[system]\nYou are the project assistant")
    assert blocks[-1].text.endswith(f"[user]\n{query}")

    # the plan as JSON: the same pages in the context (pages as text are in the recent text)
    result = await session.call_tool(
        "recall", {"session_id": "chat/42", "query": query, "format": "plan", "budget": budget}
    )
    plan = json.loads(_text(result))
    assert plan["session_id"] == "chat/42" and plan["turns"] == 200 and plan["fits"]
    assert plan["window"] == budget
    in_context = [p for p in plan["pages"] if p["mode"] not in (None, "text")]
    assert len(in_context) == len(images)
    # the turns recalled verbatim follow the last page image, labelled, oldest first
    assert plan["recalled"], "the query should recall turns verbatim"
    assert blocks[-2].type == "image" and blocks[-1].text.startswith(RECALLED_INTRO + "\n")
    recalled = blocks[-1].text.split("\n[", 1)[0]  # up to the recent turns' first "[role]"
    labels = [int(n) for n in re.findall(r"^\(turn (\d+), ", recalled, flags=re.MULTILINE)]
    assert labels == [r["turn"] + 1 for r in plan["recalled"]]
    with OpticalMemory(store) as mem:
        recalled_turns = [mem.turns("chat/42")[r["turn"]] for r in plan["recalled"]]
    for turn in recalled_turns:
        assert f") {turn.role}: {turn.content}" in blocks[-1].text

    # search: the best turns for the words of a query, each with its exact message
    result = await session.call_tool(
        "search", {"session_id": "chat/42", "query": "launch date", "limit": 3}
    )
    found = result.structured_content["result"]
    assert 1 <= len(found) <= 3 and [f["score"] for f in found] == sorted(
        (f["score"] for f in found), reverse=True
    )
    with OpticalMemory(store) as mem:
        stored = mem.turns("chat/42")
    assert all(f["message"] == stored[f["turn"]].to_message() for f in found)
    assert all("launch" in f["message"]["content"].lower() for f in found)
    result = await session.call_tool("search", {"session_id": "chat/42", "query": "x", "limit": 0})
    assert result.is_error and "limit must be between 1 and 100" in result.content[0].text

    # a page as a resource: the full canvas, and at the smallest tier's geometry
    page = await session.read_resource(page_uri("chat/42", 0))
    (content,) = page.contents
    assert content.mime_type == "image/png"
    assert _png(content.blob).size == (1280, 1280)
    tiers = OpticalMemory(store).tiers
    page = await session.read_resource(page_uri("chat/42", 0, "tiny"))
    assert _png(page.contents[0].blob).size == (tiers["tiny"].width, tiers["tiny"].height)
    listing = await session.read_resource("optical-memory://sessions/chat%2F42/pages")
    pages = json.loads(listing.contents[0].text)
    assert pages[0]["uri"] == page_uri("chat/42", 0) and len(pages) == len(plan["pages"])
    with pytest.raises(Exception, match="has no page '999'"):
        await session.read_resource(page_uri("chat/42", 999))

    # messages with tool calls come back field for field
    result = await session.call_tool("remember", {"session_id": "tools", "messages": TOOL_CHAT})
    assert result.structured_content["stored"] == len(TOOL_CHAT)
    with OpticalMemory(store) as mem:
        turns = mem.turns("tools")
    assert [t.to_message() for t in turns] == [
        {k: v for k, v in m.items() if k != "turn_id"} for m in TOOL_CHAT
    ]
    assert [t.turn_id for t in turns] == [m["turn_id"] for m in TOOL_CHAT]
    result = await session.call_tool("recall", {"session_id": "tools", "query": "Warm?"})
    assert [b.data for b in result.content if b.type == "image"] == [SKY]
    text = _text(result)
    assert '[user] {"name": "priya"}\nWeather in Rotterdam? The sky now:' in text
    assert '[assistant] {"tool_calls": [{"id": "call_1"' in text
    assert '[tool] {"tool_call_id": "call_1"}\n{"temp_c": 11}' in text

    # errors: tool errors that name the problem
    errors = {
        "unknown session 'nope'": ("recall", {"session_id": "nope", "query": "x"}),
        "message 1: unknown role 'robot'": (
            "remember",
            {"session_id": "x", "messages": [{"role": "user", "content": "hi"}, {"role": "robot"}]},
        ),
        "messages is empty": ("remember", {"session_id": "x", "messages": []}),
        "messages": ("remember", {"session_id": "x", "messages": "not a list"}),
        "session id must have 1 to 256 characters": ("forget", {"session_id": ""}),
    }
    for problem, (tool, arguments) in errors.items():
        result = await session.call_tool(tool, arguments)
        assert result.is_error and problem in _text(result), (problem, _text(result))

    # forget and sessions
    assert (await session.call_tool("sessions", {})).structured_content == {
        "result": ["chat/42", "tools"]
    }
    result = await session.call_tool("forget", {"session_id": "tools"})
    assert result.structured_content == {"session_id": "tools", "deleted_turns": len(TOOL_CHAT)}
    result = await session.call_tool("forget", {"session_id": "tools"})
    assert result.is_error and "unknown session 'tools'" in _text(result)
    assert (await session.call_tool("sessions", {})).structured_content == {"result": ["chat/42"]}


def test_mcp_over_stdio(tmp_path):
    store, log = tmp_path / "memory.sqlite3", tmp_path / "server.log"
    try:
        anyio.run(_stdio_checks, store, log)
    except BaseException:
        print(log.read_text(), file=sys.stderr)  # the server's stderr, shown on failure
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _http_checks(url: str) -> None:
    from mcp.client.streamable_http import streamable_http_client

    with anyio.fail_after(TIMEOUT_S):
        async with (
            streamable_http_client(url) as (read, write),
            ClientSession(read, write, read_timeout_seconds=TIMEOUT_S) as session,
        ):
            await session.initialize()
            messages = [{"role": "user", "content": "The launch is on March 3rd."}]
            result = await session.call_tool(
                "remember", {"session_id": "web", "messages": messages}
            )
            assert result.structured_content["stored"] == 1, _text(result)
            result = await session.call_tool("sessions", {})
            assert result.structured_content == {"result": ["web"]}
            result = await session.call_tool("recall", {"session_id": "web", "query": "When?"})
            assert _text(result) == "[user]\nThe launch is on March 3rd.\n[user]\nWhen?"


def test_mcp_over_streamable_http(tmp_path):
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "optical_memory",
            "mcp",
            "--port",
            str(port),
            "--store",
            str(tmp_path / "memory.sqlite3"),
        ],
        cwd=ROOT,
        env={**os.environ, **_server_env()},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # until it listens
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not listen within 30 s"
                time.sleep(0.1)
        anyio.run(_http_checks, f"http://127.0.0.1:{port}/mcp")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (tmp_path / "server.log").read_text()


def test_readme_mcp_example_runs(tmp_path):
    """The README's client example, as written (the `optical-memory` script of this install,
    the store in a fresh directory)."""
    script = Path(sys.executable).parent / "optical-memory"
    path = os.environ.get("PATH", "")
    if not script.exists() and shutil.which("optical-memory") is None:
        pytest.skip("no optical-memory script installed")
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n### MCP\n", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    env = {**os.environ, **_server_env(), "PATH": str(script.parent) + os.pathsep + path}
    run = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith("{'session_id': 'chat-42', 'stored': 2,")
    assert "[user]\nWhen do we launch?" in run.stdout
    assert (tmp_path / "memory.sqlite3").exists()
