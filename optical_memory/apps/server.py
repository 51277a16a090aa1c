"""`optical-memory serve`: an OpenAI-compatible memory proxy and a REST API over `OpticalMemory`.

A chatbot backend points its `openai` client's `base_url` at this server and
chats as usual; the server keeps the conversation in memory (old turns become
page images), builds each context from it and lets the configured backend
answer. The ASGI app (`create_app`) is Starlette; `serve` runs it with uvicorn.

Sessions: the `X-Session-Id` header, else the request's `user` field. A client
may send the whole history on every call (the stored prefix is recognised and
only new messages are appended) or only the new message; a history that
contradicts the stored one is a 409 naming the first differing message. The
last message is the question: a user message of text.

Tenants: API keys (`Authorization: Bearer KEY`) map to tenants; the keys file and
the `OPTICAL_MEMORY_API_KEYS` variable hold only SHA-256 hashes of the keys. A
tenant's session ids are namespaced in the store (`TENANT/ID`), so no tenant can
reach another's sessions (404, never 403). Without any key configured the
server is open: one tenant whose session ids are the store's own (the ones the
command line and the Python API use).

Every error is OpenAI-style JSON: `{"error": {"message", "type", "param", "code"}}`.
Nothing here keeps state that matters between requests: with a Redis store any
replica answers any request of any session.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import prometheus_client as prom
from anyio import to_thread
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import (
    JSONResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from optical_memory.backends import Answer, BackendError
from optical_memory.cache import VisionCache
from optical_memory.memory import (
    MAX_ID_CHARS,
    OpticalMemory,
    PinnedOverflowError,
    UnknownSessionError,
    check_id,
)
from optical_memory.messages import Message, MessageError, dump_json, parse_message
from optical_memory.stores import StoreError, Turn
from optical_memory.stores.base import StoreUnavailableError, TurnConflictError
from optical_memory.transfer import export_line

log = logging.getLogger("optical_memory.serve")

KEYS_ENV = "OPTICAL_MEMORY_API_KEYS"
DEFAULT_MAX_BODY = 16 * 1024 * 1024  # bytes of one request body
MODEL_ID = "optical-memory"
TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KEY_HASH = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
COOKIE = "om_key"
MAX_INT = 2**31 - 1  # bound of integer parameters (a store's integers are 64-bit)
# sampling settings passed on to an OpenAI-compatible upstream (other backends take none)
UPSTREAM_OPTIONS = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")


# --------------------------------------------------------------------------- errors
def history_turn_id(index: int, message: Any) -> str:
    """The turn id of a message sent in a whole history: its place and a hash of it, so that
    two requests that send the same new history at once store it once."""
    blob = json.dumps(message, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"history/{index}/{digest}"


class ApiError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.code, self.headers = code, dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message, "type": self.kind, "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def _not_found(session: str) -> ApiError:
    return ApiError(
        404, f"unknown session {session!r}: it holds no turns", "session_id",
        "not_found_error", "session_not_found",
    )


def _error_for(exc: Exception, session: str | None = None) -> ApiError:
    """The API error for an exception of the memory, its store or its backend."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownSessionError):
        return _not_found(session or "")
    if isinstance(exc, TurnConflictError):
        return ApiError(409, str(exc), "messages", "conflict_error", "turn_conflict")
    if isinstance(exc, PinnedOverflowError):
        return ApiError(400, str(exc), "messages", code="context_length_exceeded")
    if isinstance(exc, BackendError):
        return ApiError(502, f"the model failed to answer: {exc}", None, "upstream_error",
                        "backend_error")
    if isinstance(exc, StoreUnavailableError | StoreError):
        return ApiError(503, f"the store is unavailable: {exc}", None, "server_error",
                        "store_unavailable", {"Retry-After": "1"})
    if isinstance(exc, MessageError | ValueError | TypeError):
        message = str(exc)
        code = "context_length_exceeded" if "window" in message else None
        return ApiError(400, message, None, code=code)
    raise exc


# --------------------------------------------------------------------------- keys and tenants
def hash_key(key: str) -> str:
    """The SHA-256 of an API key, as the keys file holds it (hex)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(text: str, where: str) -> dict[str, str]:
    """Key hash -> tenant from lines `TENANT SHA256` (or `TENANT sha256:HEX`; `#` comments)."""
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(":", " ", 1).split() if line.count(" ") == 0 else line.split()
        if len(parts) != 2:
            raise ValueError(f"{where}: line {number}: expected 'TENANT SHA256-OF-KEY'")
        tenant, digest = parts
        match = KEY_HASH.fullmatch(digest.lower())
        if not TENANT_NAME.fullmatch(tenant) or match is None:
            raise ValueError(
                f"{where}: line {number}: tenant must match {TENANT_NAME.pattern} and the key "
                "hash must be 64 hex digits (optical-memory serve --add-key TENANT makes one)"
            )
        keys[match[1]] = tenant
    return keys


def load_keys(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Key hash -> tenant from the keys file and from $OPTICAL_MEMORY_API_KEYS
    (`TENANT:SHA256,TENANT:SHA256`); empty: no keys, the server is open."""
    env = os.environ if env is None else env
    keys: dict[str, str] = {}
    if path is not None:
        keys.update(parse_keys(Path(path).read_text(encoding="utf-8"), str(path)))
    if env.get(KEYS_ENV):
        keys.update(parse_keys(env[KEYS_ENV].replace(",", "\n"), f"${KEYS_ENV}"))
    return keys


def add_key(path: str | os.PathLike, tenant: str) -> str:
    """A new random key for `tenant`: its hash is appended to the keys file; the key is returned
    (and shown once: the file keeps only the hash)."""
    if not TENANT_NAME.fullmatch(tenant):
        raise ValueError(f"tenant must match {TENANT_NAME.pattern}, got {tenant!r}")
    key = "om-" + secrets.token_urlsafe(32)
    with Path(path).open("a", encoding="utf-8") as f:
        os.chmod(f.fileno(), 0o600)
        f.write(f"{tenant} {hash_key(key)}\n")
    return key


@dataclass(frozen=True)
class Tenant:
    """Who is asking: `name` None on an open server (no keys configured)."""

    name: str | None

    def internal(self, session: str) -> str:
        """The store's session id of this tenant's `session` (checked: 400 if invalid)."""
        try:
            check_id(session, "session id")
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc), "session_id") from None
        if self.name is None:
            return session
        full = f"{self.name}/{session}"
        if len(full) > MAX_ID_CHARS:
            raise ApiError(400, f"session id must have at most {MAX_ID_CHARS - len(self.name) - 1} "
                           f"characters, got {len(session)}", "session_id")
        return full

    def external(self, internal: str) -> str | None:
        """The tenant's id of a store session id, None if it is another tenant's."""
        if self.name is None:
            return internal
        prefix = f"{self.name}/"
        return internal[len(prefix):] if internal.startswith(prefix) else None


# --------------------------------------------------------------------------- the chat schema
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of a chat completion request this server reads (others are ignored)."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1)
    messages: list[Any] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    n: int = 1
    user: str | None = None
    temperature: float | int | None = Field(default=None, ge=0, le=2)
    top_p: float | int | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    presence_penalty: float | int | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | int | None = Field(default=None, ge=-2, le=2)


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param)


# --------------------------------------------------------------------------- metrics
class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = prom.CollectorRegistry()
        self.latency = prom.Histogram(
            "optical_memory_request_seconds", "Request latency by route (streams: to the end)",
            ["route", "method"], registry=r,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
        )
        self.requests = prom.Counter(
            "optical_memory_requests", "Requests by route and status", ["route", "method", "status"],
            registry=r,
        )
        self.tokens = prom.Counter(
            "optical_memory_tokens", "Tokens in (prompt positions) and out (completion)",
            ["direction"], registry=r,
        )
        self.positions = prom.Counter(
            "optical_memory_prompt_positions", "Prompt positions by kind (text, vision)", ["kind"],
            registry=r,
        )
        self.plain = prom.Counter(
            "optical_memory_plain_text_tokens",
            "The same histories and questions as plain text tokens", registry=r,
        )
        self.saved = prom.Counter(
            "optical_memory_positions_saved",
            "Positions saved against plain text (plain text tokens - prompt positions, when > 0)",
            registry=r,
        )
        self.cache = prom.Counter(
            "optical_memory_cache_lookups", "Cache lookups of page images and vision tokens",
            ["result"], registry=r,
        )
        self.hit_ratio = prom.Gauge(
            "optical_memory_cache_hit_ratio", "Cache hits / lookups of this process", registry=r,
        )
        self.hit_ratio.set_function(self._ratio)
        self.queue = prom.Gauge(
            "optical_memory_encode_queue_depth",
            "Pages waiting to be encoded or being encoded (the backend's encode_queue_depth; "
            "0 for a backend without an encode queue)",
            registry=r,
        )
        self.queue.set(0)
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def _ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def lookups(self, hits: int, misses: int) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses
        if hits:
            self.cache.labels("hit").inc(hits)
        if misses:
            self.cache.labels("miss").inc(misses)


class CountingCache(VisionCache):
    """The memory's cache, counting hits and misses into the metrics."""

    def __init__(self, store: Any, metrics: Metrics) -> None:
        super().__init__(store)
        self.metrics = metrics

    def get_tensor(self, session_id: str, key: str, **kw: Any) -> Any:
        value = super().get_tensor(session_id, key, **kw)
        self.metrics.lookups(value is not None, value is None)
        return value

    def get_tensors(self, session_id: str, shapes: dict, **kw: Any) -> dict:
        found = super().get_tensors(session_id, shapes, **kw)
        self.metrics.lookups(len(found), len(shapes) - len(found))
        return found

    def get_entries(self, session_id: str, keys: list[str]) -> dict[str, bytes]:
        found = super().get_entries(session_id, keys)
        self.metrics.lookups(len(found), len(set(keys)) - len(found))
        return found

    def get_image(self, session_id: str, key: str, **kw: Any) -> Any:
        value = super().get_image(session_id, key, **kw)
        self.metrics.lookups(value is not None, value is None)
        return value

    def get_pngs(self, session_id: str, keys: list[str]) -> dict[str, str]:
        found = super().get_pngs(session_id, keys)
        self.metrics.lookups(len(found), len(keys) - len(found))
        return found


# --------------------------------------------------------------------------- logs
class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def session_hash(session: str) -> str:
    """What the logs say of a session id: a short hash, never the id."""
    return hashlib.sha256(session.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# --------------------------------------------------------------------------- the app
@dataclass
class Config:
    """What `create_app` serves with. `keys`: key hash -> tenant (empty: open server)."""

    keys: dict[str, str]
    max_body: int = DEFAULT_MAX_BODY
    model_id: str = MODEL_ID
    debug: bool = False


class Server:
    """The handlers; `memory` is shared by all requests (its store and backend are thread-safe)."""

    def __init__(self, memory: OpticalMemory, config: Config) -> None:
        self.memory = memory
        self.config = config
        self.metrics = Metrics()
        memory.cache = CountingCache(memory.store, self.metrics)
        self.metrics.queue.set_function(lambda: _queue_depth(memory.backend))
        models = [config.model_id]
        # the upstream's model name (an instance attribute: a local backend's `model` property
        # would load the checkpoint here)
        upstream = vars(memory.backend).get("model") if memory.backend is not None else None
        if isinstance(upstream, str) and upstream not in models:
            models.append(upstream)
        self.models = models

    # --- plumbing ---------------------------------------------------------------------
    def authenticate(self, request: Request, cookie: bool = False) -> Tenant:
        if not self.config.keys:
            return Tenant(None)
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            key = request.cookies.get(COOKIE, "") if cookie else ""
        key = key.strip()
        if not key:
            raise ApiError(401, "no API key: send Authorization: Bearer KEY", None,
                           "authentication_error", "missing_api_key")
        digest = hash_key(key)
        tenant = next(
            (t for h, t in self.config.keys.items() if hmac.compare_digest(h, digest)), None
        )
        if tenant is None:
            raise ApiError(401, "invalid API key", None, "authentication_error",
                           "invalid_api_key")
        request.state.fields["tenant"] = tenant
        return Tenant(tenant)

    async def body(self, request: Request) -> bytes:
        """The request body, at most `max_body` bytes (413 past it, before reading it all)."""
        limit = self.config.max_body
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "invalid Content-Length header", None)
            if int(declared) > limit:
                raise self._too_large(int(declared))
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise self._too_large(len(data))
        except ClientDisconnect:
            raise ApiError(400, "the client went away before its body arrived") from None
        return bytes(data)

    def _too_large(self, size: int) -> ApiError:
        return ApiError(
            413, f"the request body has at least {size:,} bytes, over the limit of "
            f"{self.config.max_body:,} bytes (--max-body)", None, code="request_too_large",
        )

    async def json_body(self, request: Request) -> Any:
        raw = await self.body(request)
        try:
            if len(raw) > 1 << 20:  # a large body is parsed off the event loop
                return await run_in_threadpool(_parse_json, raw)
            return _parse_json(raw)
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"the request body is not UTF-8: {exc.reason} at byte "
                           f"{exc.start}") from None
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc.msg} (line "
                           f"{exc.lineno}, column {exc.colno})") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None

    async def call(self, fn: Callable[..., Any], *args: Any, session: str | None = None) -> Any:
        """Run memory work in a worker thread; its errors become API errors."""
        try:
            return await run_in_threadpool(fn, *args)
        except (ApiError, UnknownSessionError, TurnConflictError, PinnedOverflowError,
                BackendError, StoreError, MessageError, ValueError, TypeError) as exc:
            raise _error_for(exc, session) from exc

    async def existing(self, tenant: Tenant, session: str) -> str:
        """The store id of an existing session of the tenant (404 otherwise)."""
        sid = tenant.internal(session)
        count = await self.call(self.memory.store.turn_count, sid)
        if not count:
            raise _not_found(session)
        return sid

    # --- operations -------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        problems = {}
        try:
            await run_in_threadpool(self.memory.store.turn_count, "readyz")
        except Exception as exc:  # noqa: BLE001 (any failure means: not ready)
            problems["store"] = f"{type(exc).__name__}: {exc}"
        backend = self.memory.backend
        if backend is None:
            problems["model"] = "no model configured (--model)"
        elif getattr(backend, "_model", True) is None:
            problems["model"] = "the model is still loading"
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, 503)
        return JSONResponse({"status": "ready", "backend": backend.name})

    async def metrics_route(self, request: Request) -> Response:
        data = prom.generate_latest(self.metrics.registry)
        return Response(data, media_type=prom.CONTENT_TYPE_LATEST)

    async def list_models(self, request: Request) -> Response:
        self.authenticate(request)
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "optical-memory"}
            for m in self.models
        ]
        return JSONResponse({"object": "list", "data": data})

    # --- sessions ---------------------------------------------------------------------
    async def list_sessions(self, request: Request) -> Response:
        tenant = self.authenticate(request)
        ids = await self.call(self.memory.sessions)
        mine = sorted(s for s in map(tenant.external, ids) if s is not None)
        return JSONResponse({"object": "list", "data": [{"id": s, "object": "session"} for s in mine]})

    async def delete_session(self, request: Request) -> Response:
        tenant = self.authenticate(request)
        session = request.path_params["session"]
        sid = tenant.internal(session)
        if not await self.call(self.memory.delete, sid, session=session):
            raise _not_found(session)
        return JSONResponse({"id": session, "object": "session.deleted", "deleted": True})

    async def get_turns(self, request: Request) -> Response:
        tenant = self.authenticate(request)
        session = request.path_params["session"]
        sid = await self.existing(tenant, session)
        start = _int_param(request, "start", 0)
        stop = _int_param(request, "stop", None)
        turns = await self.call(self.memory.store.turns, sid, start, stop, session=session)
        return JSONResponse({"object": "list", "data": [_turn_json(t) for t in turns]})

    async def post_turns(self, request: Request) -> Response:
        tenant = self.authenticate(request)
        session = request.path_params["session"]
        sid = tenant.internal(session)
        body = await self.json_body(request)
        if isinstance(body, dict) and "messages" in body:
            messages = body["messages"]
        elif isinstance(body, dict):
            messages = [body]
        else:
            messages = body
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "send a message object, an array of messages or "
                           "{\"messages\": [...]} (not empty)", "messages")
        turns = await self.call(self.memory.extend, sid, messages, session=session)
        return JSONResponse(
            {"object": "list", "data": [{"index": t.index, "turn_id": t.turn_id} for t in turns]},
            201,
        )

    async def get_plan(self, request: Request) -> Response:
        tenant = self.authenticate(request)
        session = request.path_params["session"]
        sid = await self.existing(tenant, session)
        query = request.query_params.get("query") or None
        budget = _int_param(request, "budget", None)
        plan = await self.call(self.memory.plan, sid, query, budget, session=session)
        out = plan.to_dict()
        out["session_id"] = session
        return JSONResponse(out)

    async def page_png(self, request: Request) -> Response:
        tenant = self.authenticate(request, cookie=True)
        session = request.path_params["session"]
        sid = await self.existing(tenant, session)
        number = request.path_params["page"]
        tier = request.query_params.get("tier") or None
        width = _int_param(request, "width", None)
        if width is not None and not 16 <= width <= 4096:
            raise ApiError(400, f"width must be 16 to 4096 pixels, got {width}", "width")
        png = await self.call(self._page_png, sid, session, number, tier, width, session=session)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    def _page_png(self, sid: str, session: str, number: int, tier: str | None,
                  width: int | None) -> bytes:
        import base64
        import io

        from PIL import Image

        tiers = self.memory.tiers
        if tier is not None and tier not in tiers and tier not in ("text", "out", "full"):
            raise ApiError(400, f"unknown tier {tier!r}: one of {', '.join(tiers)}, or full "
                           "(the page as rendered)", "tier")
        records = self.memory.pages(sid)
        record = next((r for r in records if r.index == number), None)
        if record is None:
            raise ApiError(404, f"session {session!r} has no page {number} (it has "
                           f"{len(records)} pages)", "page", "not_found_error", "page_not_found")
        if tier in tiers:
            png = base64.b64decode(self.memory.page_pngs(sid, [(record, tiers[tier])])[0])
            if width is None:
                return png
            image = Image.open(io.BytesIO(png))
        else:
            image = self.memory.page_image(sid, record)
        if width is not None and image.width > width:
            image = image.resize((width, max(1, round(image.height * width / image.width))),
                                 Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "PNG", optimize=False)
        return out.getvalue()

    async def export(self, request: Request) -> Response:
        tenant = self.authenticate(request)
        session = request.path_params["session"]
        sid = await self.existing(tenant, session)
        turns = await self.call(self.memory.store.turns, sid, session=session)
        return Response("".join(export_line(t) for t in turns), media_type="application/x-ndjson")

    async def import_(self, request: Request) -> Response:
        from optical_memory.messages import _decode, _parse_array, _parse_jsonl

        tenant = self.authenticate(request)
        session = request.path_params["session"]
        sid = tenant.internal(session)
        raw = await self.body(request)

        def parse() -> list[Message]:
            text = _decode(raw, "body")
            return _parse_array(text, "body") if text.lstrip().startswith("[") else _parse_jsonl(
                text, "body")

        messages = await self.call(parse)
        if not messages:
            raise ApiError(400, "the body holds no messages (JSONL, one message a line)", None)
        turns = await self.call(self.memory.extend, sid, messages, session=session)
        return JSONResponse(
            {"object": "list", "data": [{"index": t.index, "turn_id": t.turn_id} for t in turns]},
            201,
        )

    async def stats(self, request: Request) -> Response:
        tenant = self.authenticate(request)
        session = request.path_params["session"]
        sid = await self.existing(tenant, session)
        stats = await self.call(self.memory.stats, sid, session=session)
        return JSONResponse({**asdict(stats), "session_id": session})

    # --- chat completions -------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        tenant = self.authenticate(request)
        body = await self.json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        if req.model not in self.models:
            raise ApiError(404, f"the model {req.model!r} does not exist: this server serves "
                           f"{', '.join(map(repr, self.models))}", "model", "not_found_error",
                           "model_not_found")
        if self.memory.backend is None:
            raise ApiError(503, "this server has no model to answer with (start it with "
                           "--model)", None, "server_error", "no_model")
        if req.n != 1:
            raise ApiError(400, f"n must be 1 (one answer is stored), got {req.n}", "n")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true",
                           "stream_options")
        session = request.headers.get("x-session-id") or req.user
        if not session:
            raise ApiError(400, "no session: send the X-Session-Id header or the 'user' field",
                           "X-Session-Id, user", code="missing_session")
        sid = tenant.internal(session)
        key = request.headers.get("idempotency-key")
        if key is not None:
            try:
                check_id(key, "Idempotency-Key")
            except ValueError as exc:
                raise ApiError(400, str(exc), "Idempotency-Key") from None
        max_new = req.max_completion_tokens or req.max_tokens
        options = {}
        if getattr(self.memory.backend, "name", "") == "openai":
            options = {k: getattr(req, k) for k in UPSTREAM_OPTIONS if getattr(req, k) is not None}
        timings: dict[str, float] = {}
        request.state.fields.update(session=session_hash(sid), stream=req.stream)
        if self.config.debug:
            log.debug("chat request", extra={"fields": {
                "request_id": request.state.request_id, "messages": req.messages}})
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        if not req.stream:
            # one trip to a worker thread: the event loop waits for the GIL at every trip

            def complete() -> bytes:
                t0 = time.perf_counter()
                query, appended = self._prepare(sid, req.messages, key)
                timings["prepare_ms"] = _ms(t0)
                t1 = time.perf_counter()
                answer = self._ask(sid, query, max_new, key, options)
                timings["answer_ms"] = _ms(t1)
                timings["appended"] = appended
                usage = self._usage(answer)
                body = self._completion(completion_id, req.model, answer, usage, appended)
                return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

            data = await self.call(complete, session=session)
            request.state.fields.update(timings)
            return Response(data, media_type="application/json")
        t0 = time.perf_counter()
        query, appended = await self.call(
            self._prepare, sid, req.messages, key, session=session
        )
        timings["prepare_ms"] = _ms(t0)
        request.state.fields.update(appended=appended)
        return await self._stream(request, completion_id, req, sid, session, query, max_new, key,
                                  options, appended, timings)

    def _prepare(self, sid: str, messages: list[Any], key: str | None) -> tuple[str, int]:
        """Check the request's history against the stored one, append what is new; the question."""
        parsed = []
        for i, m in enumerate(messages):
            try:
                parsed.append(parse_message(m, f"messages[{i}]"))
            except MessageError as exc:
                raise ApiError(400, str(exc), f"messages[{i}]") from None
        last = parsed[-1]
        where = f"messages[{len(parsed) - 1}]"
        if last.role != "user":
            raise ApiError(400, f"{where}: the last message is the question and must have role "
                           f"'user', got {last.role!r}", f"{where}.role")
        content = messages[-1].get("content")
        if isinstance(content, list) and any(p.get("type") != "text" for p in content):
            raise ApiError(400, f"{where}: the question must be text (send images in an earlier "
                           "message)", f"{where}.content")
        query = last.text
        if not query.strip():
            raise ApiError(400, f"{where}: the question is empty", f"{where}.content")
        history = parsed[:-1]
        store = self.memory.store
        count = store.turn_count(sid) if history else 0  # only the new message: nothing to match
        stored = store.turns(sid, 0, min(count, len(history))) if count else []
        for i, turn in enumerate(stored):
            if turn.role != history[i].role or turn.content != history[i].text:
                raise ApiError(
                    409,
                    f"messages[{i}] contradicts the stored history: the session's turn {i} is "
                    f"a {turn.role} message with other content (send the whole history as "
                    "stored, or only the new message)",
                    f"messages[{i}]", "conflict_error", "history_conflict",
                )
        new = history[count:]
        if key is not None:
            at = store.index_of(sid, key)
            if at is not None:
                question = store.turns(sid, at, at + 1)[0]
                if question.role != "user" or question.content != query:
                    raise ApiError(
                        409, f"the Idempotency-Key {key!r} was used for another question in "
                        "this session", "Idempotency-Key", "conflict_error", "idempotency_conflict",
                    )
                return query, 0
        if new:
            ids = [f"{key}/{count + j}" for j in range(len(new))] if key is not None else None
            if ids is None or any(len(i) > MAX_ID_CHARS for i in ids):
                ids = [history_turn_id(count + j, messages[count + j]) for j in range(len(new))]
            self.memory.extend(sid, new, turn_ids=ids)
        return query, len(new)

    def _ask(self, sid: str, query: str, max_new: int | None, key: str | None,
             options: dict[str, Any]) -> Answer:
        try:
            return self.memory.ask(sid, query, max_new, turn_id=key, **options)
        except TurnConflictError:
            if key is None:
                raise
            # a retry with the same key answered meanwhile (differently): its answer stands
            return self.memory.ask(sid, query, max_new, turn_id=key, **options)

    def _usage(self, answer: Answer) -> dict[str, Any]:
        """OpenAI usage, with the prompt's positions by kind and the history as plain text."""
        plan = answer.plan
        reported = answer.usage or {}
        completion = reported.get("completion_tokens")
        if not isinstance(completion, int):
            completion = self.memory.counter.count(answer.text)
        if plan is None:  # a retry answered from the store: nothing was planned
            return {"prompt_tokens": 0, "completion_tokens": completion,
                    "total_tokens": completion, "optical_memory": {"replayed": True}}
        positions = plan.positions()
        vision = positions["vision"]
        prompt = sum(positions.values()) - positions["answer"]
        text = prompt - vision
        plain = plan.history_tokens + plan.query_tokens + plan.overhead
        saved = plain - prompt
        metrics = self.metrics
        metrics.tokens.labels("in").inc(prompt)
        metrics.tokens.labels("out").inc(completion)
        metrics.positions.labels("text").inc(text)
        metrics.positions.labels("vision").inc(vision)
        metrics.plain.inc(plain)
        if saved > 0:
            metrics.saved.inc(saved)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"text_positions": text, "vision_positions": vision},
            "optical_memory": {
                "text_positions": text,
                "vision_positions": vision,
                "plain_text_tokens": plain,
                "positions_saved": saved,
                "pages_in_context": len(plan.in_context()),
                "pages": len(plan.pages),
                "turns": plan.turns,
                "window": plan.window,
                "upstream_usage": answer.usage,
            },
        }

    def _completion(self, cid: str, model: str, answer: Answer, usage: dict[str, Any],
                    appended: int) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": answer.text, "refusal": None},
                "finish_reason": answer.finish_reason or "stop",
                "logprobs": None,
            }],
            "usage": usage,
            "optical_memory": {
                "question_id": answer.question_id, "answer_id": answer.answer_id,
                "appended": appended,
            },
        }

    async def _stream(self, request: Request, cid: str, req: ChatRequest, sid: str, session: str,
                      query: str, max_new: int | None, key: str | None,
                      options: dict[str, Any], appended: int,
                      timings: dict[str, float]) -> Response:
        memory = self.memory
        t1 = time.perf_counter()
        generator = memory.stream(sid, query, max_new, key, **options)
        result: dict[str, Any] = {}

        def advance() -> str | None:
            try:
                return next(generator)
            except StopIteration as stop:
                result["answer"] = stop.value
                return None
            except TurnConflictError:
                if key is None:
                    raise
                result["answer"] = memory.ask(sid, query, max_new, turn_id=key, **options)
                return None

        first = await self.call(advance, session=session)  # errors before any byte: HTTP status
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None,
                  usage: dict[str, Any] | None = None) -> str:
            obj: dict[str, Any] = {
                "id": cid, "object": "chat.completion.chunk", "created": created,
                "model": req.model, "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": None}],
            }
            if include_usage or usage is not None:
                obj["usage"] = usage
            return f"data: {dump_json(obj)}\n\n"

        fields = request.state.fields

        def events() -> Iterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            piece = first
            try:
                while piece is not None:
                    if piece:
                        yield chunk({"content": piece})
                    piece = advance()
            except Exception as exc:  # noqa: BLE001 (after the headers: an error event)
                try:
                    error = _error_for(exc, session)
                except Exception:  # noqa: BLE001
                    error = ApiError(500, f"internal error: {type(exc).__name__}", None,
                                     "server_error")
                fields.update(status=error.status, error=error.message[:200])
                log.warning("stream failed", extra={"fields": {
                    "request_id": request.state.request_id, "error": error.message[:200]}})
                yield f"data: {dump_json(error.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            answer = result["answer"]
            if answer is not None and first is None and answer.text:
                yield chunk({"content": answer.text})
            usage = self._usage(answer)
            # without include_usage the usage rides on the last chunk, beside its choices
            yield chunk({}, answer.finish_reason or "stop", None if include_usage else usage)
            if include_usage:
                final = {
                    "id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": req.model, "system_fingerprint": None, "choices": [],
                    "usage": usage,
                    "optical_memory": {"question_id": answer.question_id,
                                       "answer_id": answer.answer_id, "appended": appended},
                }
                yield f"data: {dump_json(final)}\n\n"
            yield "data: [DONE]\n\n"
            fields.update(answer_ms=_ms(t1), **timings)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(iterate_in_threadpool(events()), media_type="text/event-stream",
                                 headers=headers)


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _parse_json(raw: bytes) -> Any:
    """JSON of a request body, strictly: UTF-8, and no NaN or Infinity."""
    return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)


def _queue_depth(backend: Any) -> float:
    try:
        return float(getattr(backend, "encode_queue_depth", 0) or 0)
    except Exception:  # noqa: BLE001 (a scrape never fails on a backend's trouble)
        return float("nan")


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def _int_param(request: Request, name: str, default: int | None) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {value[:50]!r}", name) from None
    if not 0 <= number <= MAX_INT:
        raise ApiError(400, f"{name} must be 0 to {MAX_INT}, got {value[:50]}", name)
    return number


def _turn_json(turn: Turn) -> dict[str, Any]:
    return {"index": turn.index, "turn_id": turn.turn_id, "created": turn.created,
            "message": turn.to_message()}


# --------------------------------------------------------------------------- assembly
def create_app(
    memory: OpticalMemory,
    *,
    keys: Mapping[str, str] | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    model_id: str = MODEL_ID,
    debug: bool = False,
    threads: int | None = None,
) -> Starlette:
    """The ASGI app over `memory`. `keys`: API key hash (SHA-256 hex) -> tenant, see `load_keys`
    (None or empty: an open server); `max_body`: bytes of one request body; `threads`: worker
    threads for memory and model calls (default: anyio's 40); `model_id`: the model name
    clients send (the upstream model's name is accepted too)."""
    server = Server(memory, Config(dict(keys or {}), max_body, model_id, debug))
    from optical_memory.apps import viewer

    def wrap(name: str, handler: Callable[[Request], Awaitable[Response]]) -> Callable:
        async def endpoint(request: Request) -> Response:
            t0 = time.perf_counter()
            rid = request.headers.get("x-request-id", "")
            rid = rid if REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex
            request.state.request_id = rid
            request.state.fields = {}
            try:
                response = await handler(request)
            except ApiError as exc:
                response = exc.response()
                request.state.fields["error"] = exc.message[:200]
            except Exception:
                log.exception("internal error", extra={"fields": {"request_id": rid,
                                                                  "route": name}})
                response = ApiError(500, "internal server error (see the server log, request id "
                                    f"{rid})", None, "server_error").response()
            response.headers["X-Request-Id"] = rid
            status = response.status_code

            def done() -> None:
                elapsed = time.perf_counter() - t0
                server.metrics.latency.labels(name, request.method).observe(elapsed)
                server.metrics.requests.labels(name, request.method, str(status)).inc()
                fields = {"request_id": rid, "method": request.method, "route": name,
                          "status": status, "ms": round(elapsed * 1000, 3)}
                fields.update(request.state.fields)
                if "tenant" not in fields and server.config.keys:
                    fields["tenant"] = getattr(request.state, "tenant", None)
                # probes and scrapes that succeed log at debug level: no noise every few seconds
                quiet = name in ("healthz", "readyz", "metrics") and status < 400
                log.log(logging.DEBUG if quiet else logging.INFO, "request",
                        extra={"fields": fields})

            if isinstance(response, StreamingResponse):
                inner = response.body_iterator

                async def timed() -> Any:
                    try:
                        async for part in inner:
                            yield part
                    finally:
                        done()

                response.body_iterator = timed()
            else:
                done()
            return response

        return endpoint

    def route(path: str, name: str, handler: Callable, methods: list[str]) -> Route:
        return Route(path, wrap(name, handler), methods=methods, name=name)

    s = "/v1/sessions/{session}"
    routes = [
        route("/healthz", "healthz", server.healthz, ["GET"]),
        route("/readyz", "readyz", server.readyz, ["GET"]),
        route("/metrics", "metrics", server.metrics_route, ["GET"]),
        route("/v1/models", "models", server.list_models, ["GET"]),
        route("/v1/chat/completions", "chat_completions", server.chat, ["POST"]),
        route("/v1/sessions", "sessions", server.list_sessions, ["GET"]),
        route(s, "session_delete", server.delete_session, ["DELETE"]),
        route(s + "/turns", "turns", server.get_turns, ["GET"]),
        route(s + "/turns", "turns_append", server.post_turns, ["POST"]),
        route(s + "/plan", "plan", server.get_plan, ["GET"]),
        route(s + "/stats", "stats", server.stats, ["GET"]),
        route(s + "/pages/{page:int}.png", "page_png", server.page_png, ["GET"]),
        route(s + "/export", "export", server.export, ["GET"]),
        route(s + "/import", "import", server.import_, ["POST"]),
        route("/ui/sessions/{session}", "viewer", lambda r: viewer.page(server, r), ["GET"]),
        route("/ui", "viewer_index", lambda r: viewer.index(server, r), ["GET"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = {
            404: f"no route {request.method} {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        response = ApiError(exc.status_code, message, None, kind).response()
        rid = request.headers.get("x-request-id", "")
        response.headers["X-Request-Id"] = rid if REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex
        server.metrics.requests.labels("unmatched", request.method, str(exc.status_code)).inc()
        return response

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if threads:
            to_thread.current_default_thread_limiter().total_tokens = threads
        backend = memory.backend
        if backend is not None and getattr(backend, "_model", True) is None:
            # load a local checkpoint now (readyz says "loading" until it is in memory)
            threading.Thread(target=lambda: backend.model, name="load-model", daemon=True).start()
        yield

    app = Starlette(
        routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan
    )
    app.state.server = server
    return app


def configure_logging(debug: bool = False) -> None:
    """JSON lines on stderr for the server's log (message content only with `debug`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("optical_memory")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def serve(
    store: str | None = None,
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    keys_file: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    model_id: str = MODEL_ID,
    debug: bool = False,
    device: str | None = None,
    threads: int | None = None,
) -> None:
    """Run the server with uvicorn until interrupted."""
    import uvicorn

    configure_logging(debug)
    keys = load_keys(keys_file)
    memory = OpticalMemory(store, model=model, device=device)
    if not keys:
        log.warning("no API keys configured (--keys or $%s): the server is open", KEYS_ENV,
                    extra={"fields": {"host": host, "port": port}})
    app = create_app(memory, keys=keys, max_body=max_body, model_id=model_id, debug=debug,
                     threads=threads)
    log.info("serving", extra={"fields": {
        "url": f"http://{host}:{port}/v1", "tenants": len(set(keys.values())),
        "backend": memory.backend.description if memory.backend else None}})
    try:
        uvicorn.run(app, host=host, port=port, access_log=False, log_config=None,
                    timeout_graceful_shutdown=10)
    finally:
        memory.close()


class BackgroundServer:
    """An app served by uvicorn in a thread of this process, on a free loopback port (for tests,
    benchmarks and notebooks): `with BackgroundServer(app) as server: server.base_url`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI client's base URL."""
        return self.url + "/v1"

    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True,
            name=f"serve-{self.port}",
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._thread = None
        self._socket.close()

    def __enter__(self) -> BackgroundServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
