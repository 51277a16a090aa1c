"""A small OpenAI-compatible chat server for tests, on the standard library only.

It stands in for an upstream vision model (vLLM, SGLang, a hosted API) that cannot
run in a test: it checks every request as a strict server would, records it, and
answers a fixed reply, in one piece or streamed as server-sent events.

    from optical_memory.testing import OpenAITestServer

    with OpenAITestServer(reply="The launch is on March 3rd.") as server:
        backend = OpenAIBackend(server.base_url, "test-model", max_retries=0)
        ...
        body = server.requests[-1]          # the last request's JSON body, parsed

Endpoints: POST /v1/chat/completions and GET /v1/models. A request that breaks
the protocol gets HTTP 400 with an OpenAI-style error body
`{"error": {"message", "type", "param", "code"}}` (code: the HTTP status, as vLLM
answers); one for another model than `model` (None: any model) gets 404. Failures
to simulate: `status=500` answers every chat request with that status and an error
body; `delay=2.0` waits that many seconds before answering (for client timeouts). The server listens on
127.0.0.1 on a free port and stops (shutdown, server_close) when the block exits.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
DETAILS = ("auto", "low", "high")
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)", re.DOTALL)


class RequestError(ValueError):
    """A request the server rejects: HTTP status, message and the offending parameter."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def check_chat_request(body: Any, model: str | None = None) -> None:
    """Raise RequestError where `body` is not a valid chat completion request."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise RequestError("'model' must be a non-empty string", "model")
    if model is not None and body["model"] != model:
        raise RequestError(
            f"The model `{body['model']}` does not exist.", "model", 404, "NotFoundError"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array", "messages")
    for i, message in enumerate(messages):
        check_message(message, f"messages[{i}]")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise RequestError(f"'{key}' must be a positive integer, got {value!r}", key)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise RequestError("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not body.get("stream"):
            raise RequestError(
                "'stream_options' is only allowed with 'stream': true", "stream_options"
            )
        if not isinstance(options, dict) or not isinstance(
            options.get("include_usage", False), bool
        ):
            raise RequestError("'stream_options.include_usage' must be a boolean", "stream_options")


def check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise RequestError(f"{where} must be an object", where)
    role = message.get("role")
    if role not in ROLES:
        raise RequestError(
            f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role"
        )
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise RequestError(f"{where}: a tool message needs 'tool_call_id'", f"{where}.tool_call_id")
    content = message.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        raise RequestError(
            f"{where}.content must be a string or a non-empty array of parts", f"{where}.content"
        )
    for j, part in enumerate(content):
        check_part(part, f"{where}.content[{j}]")


def check_part(part: Any, where: str) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.text must be a string", f"{where}.text")
        return
    if kind != "image_url":
        raise RequestError(
            f"{where}.type must be 'text' or 'image_url', got {kind!r}", f"{where}.type"
        )
    image = part.get("image_url")
    if not isinstance(image, dict) or not isinstance(image.get("url"), str):
        raise RequestError(f"{where}.image_url.url must be a string", f"{where}.image_url.url")
    if "detail" in image and image["detail"] not in DETAILS:
        raise RequestError(
            f"{where}.image_url.detail must be one of {', '.join(DETAILS)}",
            f"{where}.image_url.detail",
        )
    url = image["url"]
    if url.startswith("data:"):
        match = DATA_URL.fullmatch(url)
        if match is None or not match["mime"].startswith("image/"):
            raise RequestError(
                f"{where}: a data URL must be data:image/...;base64,...", f"{where}.image_url.url"
            )
        try:
            base64.b64decode(match["data"], validate=True)
        except binascii.Error as exc:
            raise RequestError(
                f"{where}: invalid base64 image data ({exc})", f"{where}.image_url.url"
            ) from None
    elif not url.startswith(("http://", "https://")):
        raise RequestError(
            f"{where}.image_url.url must be an http(s) or data URL", f"{where}.image_url.url"
        )


def split_reply(text: str, pieces: int = 3) -> list[str]:
    """`text` cut at word boundaries into at most `pieces` non-empty parts."""
    words = re.findall(r"\s*\S+\s*", text) or ([text] if text else [])
    size = max(1, -(-len(words) // pieces))
    return ["".join(words[i : i + size]) for i in range(0, len(words), size)]


class _Server(ThreadingHTTPServer):
    # the default backlog of 5 resets connections when many clients arrive at once
    request_queue_size = 128


class OpenAITestServer:
    """A fake OpenAI-compatible endpoint on 127.0.0.1 (see the module docstring).

    `requests`: the parsed JSON body of every chat request received, in order.
    `usage`: the token counts it reports for every answer.
    """

    def __init__(
        self,
        reply: str = "OK.",
        *,
        model: str | None = "test-model",
        status: int | None = None,
        delay: float = 0.0,
        prompt_tokens: int = 1000,
        completion_tokens: int | None = None,
        chunks: int = 3,
    ) -> None:
        self.reply = reply
        self.model = model
        self.status = status
        self.delay = delay
        self.chunks = chunks
        completion = len(reply.split()) if completion_tokens is None else completion_tokens
        self.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        self.requests: list[Any] = []
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not running")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> OpenAITestServer:
        handler = type("Handler", (_Handler,), {"owner": self})
        self._stopping.clear()
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = False  # server_close joins the request threads
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # wakes requests waiting out `delay`
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> OpenAITestServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- answers ---------------------------------------------------------------------
    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-test-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.reply},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": dict(self.usage),
        }

    def events(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The chat.completion.chunk objects of a streamed answer."""
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": f"chatcmpl-test-{len(self.requests)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
        }
        if with_usage:
            base["usage"] = None

        def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        out = [chunk({"role": "assistant", "content": ""})]
        out += [chunk({"content": piece}) for piece in split_reply(self.reply, self.chunks)]
        out.append(chunk({}, "stop"))
        if with_usage:
            out.append({**base, "choices": [], "usage": dict(self.usage)})
        return out


class _Handler(BaseHTTPRequestHandler):
    owner: OpenAITestServer
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads
    timeout = 10  # seconds a client may take to send its request

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        error = {"message": message, "type": kind, "param": param, "code": status}
        self.send_json(status, {"error": error})

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            return self.send_error_json(404, f"no route GET {self.path}", kind="NotFoundError")
        models = [self.owner.model or "test-model"]
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "optical-memory"} for m in models
        ]
        self.send_json(200, {"object": "list", "data": data})

    def do_POST(self) -> None:
        owner = self.owner
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self.send_error_json(404, f"no route POST {self.path}", kind="NotFoundError")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length))
        except ValueError as exc:
            return self.send_error_json(400, f"the request body is not valid JSON: {exc}")
        owner.requests.append(body)
        if owner.delay and owner._stopping.wait(owner.delay):
            return  # stopping: the client has given up long ago
        try:
            if owner.status is not None:
                phrase = HTTPStatus(owner.status).phrase
                return self.send_error_json(
                    owner.status, f"simulated upstream failure: {phrase}", kind="server_error"
                )
            try:
                check_chat_request(body, owner.model)
            except RequestError as exc:
                return self.send_error_json(exc.status, exc.message, exc.param, exc.kind)
            if not body.get("stream"):
                return self.send_json(200, owner.completion(body))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            for event in owner.events(body):
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (e.g. it timed out)
