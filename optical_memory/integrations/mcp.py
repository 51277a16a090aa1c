"""An MCP server over an `OpticalMemory`: `optical-memory mcp`, on the official MCP Python SDK.

Tools: `remember` (append turns), `recall` (the plan, or the context for a query as text and
page images), `forget` (delete a session), `sessions`. Resources: each page of a session as a
PNG (`optical-memory://sessions/{session_id}/pages/{page}.png`, optionally `?tier=NAME` for
the page at a tier's geometry) and the list of a session's pages as JSON
(`optical-memory://sessions/{session_id}/pages`).

    from optical_memory.integrations.mcp import create_server, serve

    serve("sqlite:///srv/memory.sqlite3", profile="gpt-4o")             # stdio
    serve("sqlite:///srv/memory.sqlite3", port=8765)   # streamable HTTP, http://127.0.0.1:8765/mcp
    server = create_server(mem)     # the server object, to run or mount yourself

Needs the `mcp` extra (`pip install "optical-memory[mcp]"`): mcp 2.x (`MCPServer`) or 1.x
(`FastMCP`; there pages are served at the full canvas only, no `?tier=`). Tool calls are
served one at a time (an `OpticalMemory` is not meant to be shared between threads).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal
from urllib.parse import quote, unquote

from mcp.types import ImageContent, TextContent, ToolAnnotations
from typing_extensions import TypedDict  # pydantic reads it in lists on Python < 3.12

from optical_memory.cache import encode_png
from optical_memory.memory import OpticalMemory, check_id
from optical_memory.pages import PageRecord
from optical_memory.stores import Store, StoreError

try:  # mcp 2.x
    from mcp.server.mcpserver import MCPServer as _Server
    from mcp.server.mcpserver import ResourceSecurity
    from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError

    _SDK2 = True
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as _Server  # type: ignore[no-redef]
    from mcp.server.fastmcp.exceptions import (  # type: ignore[no-redef]
        ResourceError,
        ToolError,
    )

    ResourceNotFoundError = ResourceError  # type: ignore[misc,assignment]
    ResourceSecurity = None  # type: ignore[misc,assignment]
    _SDK2 = False

__all__ = ["PAGES_URI", "PAGE_URI", "create_server", "page_uri", "serve"]

SCHEME = "optical-memory"
PAGE_URI = SCHEME + "://sessions/{session_id}/pages/{page}.png"
PAGES_URI = SCHEME + "://sessions/{session_id}/pages"
# the API's anticipated errors, as the command line sees them
_ERRORS = (ValueError, LookupError, TypeError, StoreError, OSError)

INSTRUCTIONS = """\
Long-term chat memory. `remember` appends OpenAI-format chat messages ({"role": ...,
"content": ...}, any fields, optional "turn_id" to make a retry store nothing twice) to a
session; `recall` gives the context for a query: the system prompt, older turns as labelled
page images (oldest first, fading with age), recent turns as text and the query last
(format="plan": what the context holds, as JSON); `forget` deletes a session; `sessions` lists
them. Each page is also a resource: optical-memory://sessions/{session_id}/pages/{page}.png."""


class Remembered(TypedDict):
    """What `remember` did."""

    session_id: str
    stored: int  # turns appended now
    already_stored: int  # turns whose turn_id was stored before (with the same message)
    turns: int  # turns of the session in all


class Forgotten(TypedDict):
    """What `forget` did."""

    session_id: str
    deleted_turns: int


class Found(TypedDict):
    """A turn `search` found: its index, BM25 score, id and message."""

    turn: int
    score: float
    turn_id: str
    message: dict[str, Any]


def page_uri(session_id: str, page: int, tier: str | None = None) -> str:
    """The resource URI of a page (the session id percent-encoded)."""
    uri = f"{SCHEME}://sessions/{quote(session_id, safe='')}/pages/{page}.png"
    return uri + (f"?tier={quote(tier, safe='')}" if tier else "")


def create_server(
    memory: OpticalMemory | str | os.PathLike | Store | None = None,
    *,
    profile: str | None = None,
    name: str = "optical-memory",
) -> Any:
    """An MCP server (`MCPServer`, or `FastMCP` on mcp 1.x) over `memory`: an `OpticalMemory`,
    or a store for one (URL, path, `Store`; None: `$OPTICAL_MEMORY_STORE`, else the embedded
    SQLite file) read with `profile` (how the reading model counts images; default
    DeepSeek-OCR). Run it with `.run()` (stdio) or `.run("streamable-http", ...)`."""
    if isinstance(memory, OpticalMemory):
        if profile is not None:
            raise ValueError("pass profile= only with a store, not with an OpticalMemory")
        mem = memory
    else:
        mem = OpticalMemory(memory, profile=profile)
    lock = threading.Lock()
    server = _Server(name, instructions=INSTRUCTIONS)

    @contextmanager
    def memory_errors(
        error: type[Exception], not_found: type[Exception] | None = None
    ) -> Iterator[None]:
        """Serve one call at a time; the API's errors become `error` (an unknown session or
        page, a bad argument: `not_found`, if given) with their message."""
        with lock:
            try:
                yield
            except _ERRORS as exc:
                bad = not_found is not None and isinstance(exc, (LookupError, ValueError))
                raise (not_found if bad else error)(_describe(exc)) from exc

    @server.tool(
        annotations=ToolAnnotations(
            title="Remember chat turns",
            readOnlyHint=False,
            destructiveHint=False,
            idempotentHint=False,
            openWorldHint=False,
        ),
    )
    def remember(session_id: str, messages: list[dict[str, Any]]) -> Remembered:
        """Append chat messages to a session's memory, in order, in one batch (all or nothing).

        `messages`: OpenAI-format chat messages, e.g. {"role": "user", "content": "..."},
        {"role": "assistant", "content": null, "tool_calls": [...]}, {"role": "tool",
        "content": "...", "tool_call_id": "..."}; content may be a list of parts (text,
        image_url with a data URL). Every field is kept. A message's optional "turn_id" makes
        a retry idempotent: a turn already stored under its id is not stored again.
        Creates the session if it does not exist."""
        with memory_errors(ToolError):
            check_id(session_id, "session id")
            if not messages:
                raise ValueError("messages is empty: give at least one message")
            before = mem.store.turn_count(session_id)
            stored = mem.extend(session_id, messages)
            new = sum(t.index >= before for t in stored)
            return Remembered(
                session_id=session_id,
                stored=new,
                already_stored=len(stored) - new,
                turns=mem.store.turn_count(session_id),
            )

    @server.tool(
        annotations=ToolAnnotations(
            title="Recall the context for a query", readOnlyHint=True, openWorldHint=False
        ),
    )
    def recall(
        session_id: str,
        query: str | None = None,
        format: Literal["messages", "plan"] = "messages",
        budget: int | None = None,
    ) -> list[TextContent | ImageContent]:
        """The memory of a session as a model should read it to answer `query`.

        format="messages" (default): the context, message by message, each beginning with
        "[role]": pinned system turns, one user message of labelled page images of the older
        turns (PNG, oldest first; older pages at lower resolution) and of the turns the query
        recalls verbatim, the recent turns as text, then the query (a history that fits the
        window comes as text, without page images). format="plan": JSON of what the context holds (pages, their tiers,
        token counts against the window). `budget`: positions (default: the window)."""
        with memory_errors(ToolError):
            if format == "plan":
                plan = mem.plan(session_id, query, budget)
                return [TextContent(type="text", text=plan.to_json())]
            return _blocks(mem.messages(session_id, query, budget))

    @server.tool(
        annotations=ToolAnnotations(
            title="Search a session's turns", readOnlyHint=True, openWorldHint=False
        ),
    )
    def search(session_id: str, query: str, limit: int = 10) -> list[Found]:
        """The turns of a session that best match `query` (BM25 over the words of every turn),
        best first, each with its exact stored message: for quoting what was said, word for
        word. `limit`: at most this many turns (1 to 100)."""
        with memory_errors(ToolError):
            if not 1 <= limit <= 100:
                raise ValueError(f"limit must be between 1 and 100, got {limit}")
            found = []
            for hit in mem.search(session_id, query, limit):
                (turn,) = mem.turns(session_id, hit.turn, hit.turn + 1)
                found.append(
                    Found(turn=hit.turn, score=hit.score, turn_id=turn.turn_id,
                          message=turn.to_message())
                )
            return found

    @server.tool(
        annotations=ToolAnnotations(
            title="Forget a session",
            readOnlyHint=False,
            destructiveHint=True,
            idempotentHint=True,
            openWorldHint=False,
        ),
    )
    def forget(session_id: str) -> Forgotten:
        """Delete a session: its turns, pages and cached images. An unknown session is an
        error."""
        with memory_errors(ToolError):
            check_id(session_id, "session id")
            count = mem.store.turn_count(session_id)
            if not mem.delete(session_id):
                raise LookupError(
                    f"unknown session {session_id!r}: it holds no turns; nothing deleted"
                )
            return Forgotten(session_id=session_id, deleted_turns=count)

    @server.tool(
        annotations=ToolAnnotations(title="List sessions", readOnlyHint=True, openWorldHint=False),
    )
    def sessions() -> list[str]:
        """The ids of the sessions in the memory."""
        with memory_errors(ToolError):
            return mem.sessions()

    def find_page(session_id: str, page: str) -> PageRecord:
        records = mem.pages(session_id)
        if not page.isdigit() or int(page) >= len(records):
            raise ResourceNotFoundError(
                f"session {session_id!r} has no page {page!r}: its pages are 0 to "
                f"{len(records) - 1}"
                if records
                else f"session {session_id!r} has no pages yet"
            )
        return next(r for r in records if r.index == int(page))

    security = (
        {}
        if ResourceSecurity is None
        else {
            "security": ResourceSecurity(exempt_params={"session_id"})  # ids are hashed into keys
        }
    )

    def page_png(session_id: str, page: str, tier: str | None = None) -> bytes:
        """A page of a session's transcript as a PNG: the full canvas, or `tier`'s geometry."""
        with memory_errors(ResourceError, ResourceNotFoundError):
            record = find_page(session_id, page)
            if tier is None:
                return encode_png(mem.page_image(session_id, record))
            tiers = mem.tiers
            if tier not in tiers:
                raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(tiers)}")
            return base64.b64decode(mem.page_pngs(session_id, [(record, tiers[tier])])[0])

    def page_list(session_id: str) -> str:
        """A session's pages as JSON: index, first and last turn, sealed, the image's URI."""
        with memory_errors(ResourceError, ResourceNotFoundError):
            records = mem.pages(session_id)
            return json.dumps(
                [
                    {
                        "page": r.index,
                        "first_turn": r.first_turn,
                        "last_turn": r.last_turn,
                        "sealed": r.sealed,
                        "uri": page_uri(session_id, r.index),
                    }
                    for r in records
                ],
                indent=1,
                ensure_ascii=False,
            )

    page = {"name": "page", "title": "Page image", "mime_type": "image/png"}
    pages = {"name": "pages", "title": "Pages of a session", "mime_type": "application/json"}
    if _SDK2:
        server.resource(PAGE_URI + "{?tier}", description=page_png.__doc__, **page, **security)(
            page_png
        )
        server.resource(PAGES_URI, description=page_list.__doc__, **pages, **security)(page_list)
    else:  # FastMCP 1.x: no query variables, and the values come percent-encoded

        def page_png_v1(session_id: str, page: str) -> bytes:
            return page_png(unquote(session_id), unquote(page))

        def page_list_v1(session_id: str) -> str:
            return page_list(unquote(session_id))

        server.resource(PAGE_URI, description=page_png.__doc__, **page)(page_png_v1)
        server.resource(PAGES_URI, description=page_list.__doc__, **pages)(page_list_v1)

    server.memory = mem  # type: ignore[attr-defined]  # for `serve` and embedding code
    return server


def serve(
    store: OpticalMemory | str | os.PathLike | Store | None = None,
    *,
    profile: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> None:
    """Run the server until it is stopped: over stdio, or streamable HTTP at
    http://HOST:PORT/mcp with `port`. A memory opened here is closed afterwards."""
    server = create_server(store, profile=profile)
    try:
        if port is None:
            server.run()
        elif _SDK2:
            server.run("streamable-http", host=host, port=port)
        else:
            server.settings.host, server.settings.port = host, port
            server.run("streamable-http")
    finally:
        if not isinstance(store, OpticalMemory):
            server.memory.close()


# --- OpenAI chat messages -> MCP content -------------------------------------------------
def _blocks(messages: Sequence[Mapping[str, Any]]) -> list[TextContent | ImageContent]:
    """Chat messages as MCP content: per message, "[role]" (with its other fields, such as
    tool_calls, as JSON) and its text, text parts as text, data-URL images as image content
    (other image URLs named in text). Consecutive text is joined into one block."""
    out: list[TextContent | ImageContent] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            out.append(TextContent(type="text", text="\n".join(texts)))
            texts.clear()

    for message in messages:
        extra = {k: v for k, v in message.items() if k not in ("role", "content")}
        head = f"[{message.get('role')}]"
        if extra:
            head += " " + json.dumps(extra, ensure_ascii=False)
        texts.append(head)
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            if part is None:
                continue
            if isinstance(part, str):
                texts.append(part)
            elif part.get("type") == "image_url":
                url = _url(part.get("image_url"))
                image = _data_url(url)
                if image is None:
                    texts.append(f"[image: {url}]")
                else:
                    flush()
                    out.append(ImageContent(type="image", data=image[1], mimeType=image[0]))
            elif part.get("type") in ("text", "refusal"):
                texts.append(str(part.get(part["type"], "")))
            else:  # audio, files, ...: named, as on the pages
                texts.append(_placeholder(part))
    flush()
    return out


def _placeholder(part: Mapping[str, Any]) -> str:
    kind = str(part.get("type"))
    info = part.get(kind)
    info = info if isinstance(info, Mapping) else {}
    detail = info.get("format") if kind == "input_audio" else info.get("filename")
    detail = detail or (info.get("file_id") if kind == "file" else None)
    return f"[{kind.removeprefix('input_')}: {detail}]" if detail else f"[{kind}]"


def _url(image_url: object) -> str:
    return str(image_url.get("url", "")) if isinstance(image_url, Mapping) else str(image_url)


def _data_url(url: str) -> tuple[str, str] | None:
    """(mime type, base64 data) of a base64 image data URL, else None."""
    head, sep, data = url.partition(",")
    if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
        return None
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    return head[len("data:") : -len(";base64")], data


def _describe(exc: BaseException) -> str:
    """The message of an API error, as the command line words it."""
    text = str(exc)
    return text if text else type(exc).__name__
