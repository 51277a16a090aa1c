"""Chat messages in the OpenAI format, kept exactly as given, and transcripts of them.

A message is any Chat Completions message: `content` as a string, as null (an
assistant message with `tool_calls`), or as a list of parts (`text`,
`image_url` with a data URL or an http(s) URL, `input_audio`, `file`,
`refusal`, and any other type, kept as given); `name`; assistant `tool_calls`
and the legacy `function_call`; the `tool` role with `tool_call_id`; the legacy
`function` role. Every other field of a message is kept too.

A `Message` holds the message as given (less its "turn_id": that field is an
instruction to the memory, the idempotency key of the turn, not part of the
message) and its JSON text in one fixed style (`dump_json`: key order as given,
UTF-8 rather than escapes, compact separators): the text the stores keep and
export writes, so a message comes back out byte for byte.

What a page shows of a message is its render text (`render_text`): text parts
joined by newlines, each tool call as `name(arguments)` in a fenced code block
(set in the monospace face), http(s) images as "[image: URL]" (never fetched),
audio and files as "[audio]" / "[file: name]", and each data-URL image as one
U+FFFC (IMAGE_SLOT) character that the renderer draws as the picture. `name`
and `tool_call_id` go into the turn's label ("ASSISTANT (lookup)", "TOOL
(call_1)"). A plain message (string content, no name) renders as its content.

A transcript is a JSONL file (one message object per line), a JSON array of
message objects, or "-" for standard input. Every error names where the
problem is (line number for JSONL, array index for JSON arrays) and what it is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool", "function")

IMAGE_SLOT = "\ufffc"  # U+FFFC OBJECT REPLACEMENT CHARACTER: one per data-URL image
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what a data-URL image may be (as OpenAI takes)
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # default bound of one data-URL image, decoded
LABEL_DETAIL_CHARS = 40  # a name or call id longer than this is cut in the turn label

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)
_IMAGE_MIMES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif")
# The fields of the Chat Completions message format: `chat_messages` sends only these.
CHAT_FIELDS = (
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "function_call",
    "refusal",
    "audio",
)
_ABSENT = object()


class MessageError(ValueError):
    """A message or transcript that cannot be used; the text says where and why."""


def dump_json(obj: Any) -> str:
    """JSON text in the one style messages are stored and exported in: keys in the order given,
    non-ASCII as UTF-8 (not escaped), compact separators; NaN and infinities are refused."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class ImageData:
    """A data-URL image of a message, decoded: its bytes, format and size in pixels."""

    data: bytes = field(repr=False)
    format: str
    width: int
    height: int
    sha256: str

    def open(self) -> Image.Image:
        """The (first frame of the) image as RGB, any transparency laid on white paper."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(self.data))
            image.load()
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(paper, rgba).convert("RGB")
        return image.convert("RGB")


class Message:
    """One chat message in the OpenAI format, exactly as given; immutable.

    `Message(role, content, **fields)` or `parse_message(obj)`. `to_dict()` gives the
    message back (a fresh copy), `json` its stored text, `text` its render text,
    `turn_id` the "turn_id" the input carried (not part of the message), `images()`
    its data-URL images in order. Equal messages have equal JSON text.
    """

    __slots__ = ("_data", "_images", "_json", "_slots", "_text", "_verified", "turn_id")

    def __init__(self, role: str, content: Any = _ABSENT, **fields: Any) -> None:
        data: dict[str, Any] = {"role": role}
        if content is not _ABSENT:
            data["content"] = content
        data.update(fields)
        _init(self, data, "message")

    # --- what was given ------------------------------------------------------------
    @property
    def role(self) -> str:
        return self._data["role"]

    @property
    def content(self) -> Any:
        """The content as given: a string, None, or a list of parts (a copy)."""
        return self.to_dict().get("content")

    @property
    def name(self) -> str | None:
        return self._data.get("name")

    def created(self, where: str = "message") -> float | None:
        """The time the message carries in "created_at" (Unix seconds, or an ISO 8601 date
        and time; without a zone, UTC), None when it has none. A message from the future (by
        more than a day), before 1970 or not a time raises MessageError."""
        value = self._data.get("created_at")
        if value is None:
            return None
        if isinstance(value, str):
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                raise MessageError(
                    f"{where}: 'created_at' {value[:40]!r} is not an ISO 8601 date and time"
                ) from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = when.timestamp()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        else:
            raise MessageError(
                f"{where}: 'created_at' must be Unix seconds or an ISO 8601 string, "
                f"got {_json_type(value)}"
            )
        if not 0 <= seconds <= time.time() + 86400:  # NaN fails too
            raise MessageError(
                f"{where}: 'created_at' {value!r} is not a time between 1970 and tomorrow"
            )
        return seconds

    @property
    def json(self) -> str:
        """The message as stored: `dump_json` of the message as given, less its "turn_id"."""
        return self._json

    def to_dict(self) -> dict[str, Any]:
        """The message as given (less its "turn_id"), a fresh copy."""
        return json.loads(self._json)

    # --- what a page shows -----------------------------------------------------------
    @property
    def text(self) -> str:
        """The render text (see the module docstring); laid out on pages and counted."""
        if self._text is None:
            self._cache(*_render(self._data))
        return self._text

    @property
    def image_slots(self) -> tuple[int, ...]:
        """Offsets in `text` of the data-URL images' IMAGE_SLOT characters, in order."""
        if self._slots is None:
            self._cache(*_render(self._data))
        return self._slots

    def _cache(self, text: str, slots: tuple[int, ...]) -> None:
        object.__setattr__(self, "_text", text)
        object.__setattr__(self, "_slots", slots)

    @property
    def label_detail(self) -> str:
        """What the turn label shows after the role: the name and the tool call id, if any."""
        bits = [self._data.get(k) for k in ("name", "tool_call_id")]
        return ", ".join(_cut(b) for b in bits if isinstance(b, str) and b)

    @property
    def plain(self) -> bool:
        """Whether this is {"role": ..., "content": "a string"} and nothing else."""
        return self._json == dump_json({"role": self.role, "content": self._data.get("content")})

    def images(self) -> tuple[ImageData, ...]:
        """The data-URL images in the order of the parts (headers read, pixels decoded lazily)."""
        if self._images is None:
            object.__setattr__(
                self,
                "_images",
                tuple(
                    decode_image(url, f"message: content[{j}]", None, verify=False)
                    for j, url in _image_urls(self._data)
                ),
            )
        return self._images

    def check_images(self, where: str, max_bytes: int | None = MAX_IMAGE_BYTES) -> None:
        """Refuse a data-URL image over `max_bytes` (decoded), over Pillow's pixel limit (the
        decompression-bomb guard) or that does not decode, and other inline data (audio
        `data`, a file's `file_data`) over `max_bytes`; the error names `where` and the part."""
        _check_inline(self._data, where, max_bytes)
        urls = _image_urls(self._data)
        if self._verified:  # decoded once already: only the size limit is left to check
            for (j, url), image in zip(urls, self.images()):
                if max_bytes is not None and len(image.data) > max_bytes:
                    decode_image(url, f"{where}: content[{j}]", max_bytes, verify=False)
            return
        images = tuple(
            decode_image(url, f"{where}: content[{j}]", max_bytes, verify=True) for j, url in urls
        )
        object.__setattr__(self, "_images", images)
        object.__setattr__(self, "_verified", True)

    def __reduce__(self) -> tuple[Any, ...]:
        return _from_json, (self._json, self.turn_id)

    # --- value semantics -----------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and other._json == self._json

    def __hash__(self) -> int:
        return hash(self._json)

    def __setattr__(self, name: str, value: Any) -> None:
        if hasattr(self, "_json"):
            raise AttributeError(f"Message is immutable: cannot set {name!r}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        text = self._json if len(self._json) <= 200 else self._json[:197] + "..."
        return f"Message({text})"


def _init(message: Message, data: dict[str, Any], where: str, turn_id: Any = None) -> None:
    _check_message(data, where)
    try:
        text = dump_json(data)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"{where}: not JSON: {exc}") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MessageError(f"{where}: {_surrogate(data)}") from None
    if isinstance(turn_id, str) and _has_surrogate(turn_id):
        raise MessageError(f"{where}: 'turn_id' {_surrogate_in(turn_id)}")
    for slot, value in (
        ("_data", data),
        ("_json", text),
        ("_text", None),
        ("_slots", None),
        ("_images", None),
        ("_verified", False),
        ("turn_id", turn_id),
    ):
        object.__setattr__(message, slot, value)


def parse_message(obj: Any, where: str = "message") -> Message:
    """A Message from a decoded JSON object (or a Message); `where` prefixes any error
    (e.g. "line 3"). A "turn_id" field becomes the message's `turn_id`, not part of it."""
    if isinstance(obj, Message):
        return obj
    if not isinstance(obj, Mapping):
        raise MessageError(f"{where}: expected a JSON object, got {_json_type(obj)}")
    data = {k: v for k, v in obj.items() if k != "turn_id"}
    turn_id = obj.get("turn_id")
    if turn_id is not None and not isinstance(turn_id, str):
        raise MessageError(f"{where}: 'turn_id' must be a string, got {_json_type(turn_id)}")
    message = Message.__new__(Message)
    _init(message, data, where, turn_id)
    return message


def _from_json(text: str, turn_id: str | None) -> Message:
    obj = json.loads(text)
    if turn_id is not None:
        obj["turn_id"] = turn_id
    return parse_message(obj)


def render_text(message: Message | Mapping[str, Any]) -> str:
    """The render text of a message (see the module docstring): what its page shows."""
    return parse_message(message).text


# --- validation -------------------------------------------------------------------------
def _check_message(data: Mapping[str, Any], where: str) -> None:
    for key in data:
        if not isinstance(key, str):
            raise MessageError(f"{where}: field names must be strings, got {key!r}")
    if "role" not in data:
        raise MessageError(f"{where}: missing 'role'")
    role = data["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise MessageError(f"{where}: unknown role {role!r}; valid roles: {', '.join(ROLES)}")
    for key in ("name", "tool_call_id", "refusal"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise MessageError(f"{where}: '{key}' must be a string, got {_json_type(value)}")
    calls = data.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise MessageError(f"{where}: 'tool_calls' belong to assistant messages, not {role!r}")
        if not isinstance(calls, list):
            raise MessageError(f"{where}: 'tool_calls' must be an array, got {_json_type(calls)}")
        for j, call in enumerate(calls):
            _check_tool_call(call, f"{where}: tool_calls[{j}]")
    legacy = data.get("function_call")
    if legacy is not None:
        if role != "assistant":
            raise MessageError(
                f"{where}: 'function_call' belongs to assistant messages, not {role!r}"
            )
        _check_function(legacy, f"{where}: function_call")
    answered = role == "assistant" and any(
        data.get(k) is not None for k in ("tool_calls", "function_call", "refusal", "audio")
    )
    if "content" not in data:
        if answered:
            return
        raise MessageError(f"{where}: missing 'content'")
    content = data["content"]
    if isinstance(content, str):
        return
    if content is None:
        if answered or role == "function":
            return
        raise MessageError(
            f"{where}: 'content' must be a string, got null (null content is for assistant "
            "messages with 'tool_calls')"
        )
    if not isinstance(content, list):
        raise MessageError(
            f"{where}: 'content' must be a string, got {_json_type(content)} "
            "(or an array of content parts)"
        )
    for j, part in enumerate(content):
        _check_part(part, f"{where}: content[{j}]")


def _check_tool_call(call: Any, where: str) -> None:
    if not isinstance(call, Mapping):
        raise MessageError(f"{where}: expected an object, got {_json_type(call)}")
    kind = call.get("type", "function")
    if not isinstance(kind, str):
        raise MessageError(f"{where}: 'type' must be a string, got {_json_type(kind)}")
    if "id" in call and not isinstance(call["id"], str):
        raise MessageError(f"{where}: 'id' must be a string, got {_json_type(call['id'])}")
    if kind == "function":
        _check_function(call.get("function"), f"{where}: function")
    elif kind == "custom":
        custom = call.get("custom")
        if not isinstance(custom, Mapping) or not isinstance(custom.get("name"), str):
            raise MessageError(f"{where}: a custom tool call needs 'custom' with a 'name'")
        if not isinstance(custom.get("input", ""), str):
            raise MessageError(f"{where}: custom: 'input' must be a string")


def _check_function(fn: Any, where: str) -> None:
    if not isinstance(fn, Mapping):
        raise MessageError(
            f"{where}: expected an object with 'name' and 'arguments', got {_json_type(fn)}"
        )
    for key in ("name", "arguments"):
        if not isinstance(fn.get(key), str):
            raise MessageError(
                f"{where}: '{key}' must be a string, got {_json_type(fn.get(key))}"
                + (" (the arguments are JSON text)" if key == "arguments" else "")
            )


def _check_part(part: Any, where: str) -> None:
    if not isinstance(part, Mapping):
        raise MessageError(f"{where}: expected a content part object, got {_json_type(part)}")
    kind = part.get("type")
    if not isinstance(kind, str):
        raise MessageError(f"{where}: a content part needs a 'type' string")
    if kind in ("text", "refusal"):
        if not isinstance(part.get(kind), str):
            raise MessageError(
                f"{where}: a {kind!r} part needs '{kind}' as a string, "
                f"got {_json_type(part.get(kind))}"
            )
    elif kind == "image_url":
        image = part.get("image_url")
        if not isinstance(image, Mapping) or not isinstance(image.get("url"), str):
            raise MessageError(f"{where}: an 'image_url' part needs 'image_url': {{'url': ...}}")
        detail = image.get("detail")
        if detail is not None and not isinstance(detail, str):
            raise MessageError(f"{where}: image_url.detail must be a string")
        _check_url(image["url"], where)
    elif kind in ("input_audio", "file") and not isinstance(part.get(kind), Mapping):
        raise MessageError(f"{where}: an {kind!r} part needs '{kind}' as an object")


def _check_url(url: str, where: str) -> None:
    if url[:5].lower() == "data:":
        match = _DATA_URL.fullmatch(url)
        mime = match["mime"].lower() if match else ""
        if mime not in _IMAGE_MIMES:
            raise MessageError(
                f"{where}: a data-URL image must be PNG, JPEG, WebP or GIF, got {mime or url[:40]!r}"
            )
        if not match["params"].lower().endswith(";base64"):
            raise MessageError(f"{where}: a data-URL image must be base64 (data:{mime};base64,...)")
    elif not url[:8].lower().startswith(("http://", "https://")):
        raise MessageError(
            f"{where}: image_url.url must be a data: URL or an http(s) URL, got {url[:40]!r}"
        )


def _image_urls(data: Mapping[str, Any]) -> list[tuple[int, str]]:
    """(part index, data URL) of each data-URL image part, in order."""
    content = data.get("content")
    if not isinstance(content, list):
        return []
    return [
        (j, part["image_url"]["url"])
        for j, part in enumerate(content)
        if part.get("type") == "image_url" and part["image_url"]["url"][:5].lower() == "data:"
    ]


def _check_inline(data: Mapping[str, Any], where: str, max_bytes: int | None) -> None:
    """Refuse base64 audio or file data of a content part over `max_bytes` (about, decoded)."""
    content = data.get("content")
    if max_bytes is None or not isinstance(content, list):
        return
    for j, part in enumerate(content):
        kind = part.get("type")
        inner = part.get(kind) if kind in ("input_audio", "file") else None
        payload = inner.get("data" if kind == "input_audio" else "file_data") if inner else None
        if isinstance(payload, str) and len(payload) // 4 * 3 > max_bytes + 3:
            raise MessageError(
                f"{where}: content[{j}]: the {kind} data has about {len(payload) // 4 * 3:,} "
                f"bytes, over the limit of {max_bytes:,} (max_image_bytes)"
            )


def decode_image(
    url: str, where: str, max_bytes: int | None = MAX_IMAGE_BYTES, verify: bool = True
) -> ImageData:
    """A base64 data-URL image, checked: at most `max_bytes` decoded (None: any), within
    Pillow's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`, the decompression-bomb guard), PNG,
    JPEG, WebP or GIF, and (with `verify`) decoding completely."""
    payload = url[url.index(",") + 1 :]
    if max_bytes is not None and len(payload) // 4 * 3 > max_bytes + 3:
        raise MessageError(
            f"{where}: the image has about {len(payload) // 4 * 3:,} bytes, over the limit of "
            f"{max_bytes:,} (max_image_bytes)"
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MessageError(f"{where}: the data-URL image is not valid base64 ({exc})") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise MessageError(
            f"{where}: the image has {len(raw):,} bytes, over the limit of {max_bytes:,} "
            "(max_image_bytes)"
        )
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if limit and width * height > limit:
                raise Image.DecompressionBombError(f"{width}x{height} pixels")
            if image.format not in IMAGE_FORMATS:
                raise MessageError(
                    f"{where}: the image is {image.format}, not PNG, JPEG, WebP or GIF"
                )
            if verify:
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # ours names the size; Pillow's own (raised while opening) the number of pixels
            found = re.search(r"(\d+x\d+ pixels)|Image size \((\d+) pixels\)", str(exc))
            size = "too large"
            if found:
                size = found[1] or f"{int(found[2]):,} pixels"
            raise MessageError(
                f"{where}: the image is {size}, over the limit of {limit:,} pixels "
                "(Pillow's decompression-bomb guard, PIL.Image.MAX_IMAGE_PIXELS)"
            ) from None
        except UnidentifiedImageError:
            raise MessageError(
                f"{where}: the data-URL image is not an image Pillow can read"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            if isinstance(exc, MessageError):
                raise
            raise MessageError(f"{where}: the image does not decode ({exc})") from None
    return ImageData(raw, image.format, width, height, hashlib.sha256(raw).hexdigest())


# --- render text ------------------------------------------------------------------------
def _render(data: Mapping[str, Any]) -> tuple[str, tuple[int, ...]]:
    """The render text of a checked message, and the offsets of its image slots."""
    blocks: list[str] = []
    slots: list[int] = []
    at = 0  # length of "\n".join(blocks) so far, plus the joining newline

    def add(block: str, slot: bool = False) -> None:
        nonlocal at
        if not block:
            return
        if blocks:
            at += 1
        if slot:
            slots.append(at)
        blocks.append(block)
        at += len(block)

    content = data.get("content")
    if isinstance(content, str):
        add(content)
    elif isinstance(content, list):
        for part in content:
            text, slot = _part_text(part)
            add(text, slot)
    if data.get("role") == "assistant":
        refusal = data.get("refusal")
        if isinstance(refusal, str) and not isinstance(content, list):
            add(f"[refusal] {refusal}" if content else refusal)
        if data.get("audio") is not None and content is None:
            add("[audio]")
        calls = [_call_text(c) for c in data.get("tool_calls") or ()]
        legacy = data.get("function_call")
        if legacy is not None:
            calls.append(f"{legacy['name']}({legacy['arguments']})")
        if calls:
            add("```\n" + "\n".join(calls) + "\n```")
    return "\n".join(blocks), tuple(slots)


def _part_text(part: Mapping[str, Any]) -> tuple[str, bool]:
    kind = part["type"]
    if kind in ("text", "refusal"):
        return part[kind], False
    if kind == "image_url":
        url = part["image_url"]["url"]
        return (IMAGE_SLOT, True) if url[:5].lower() == "data:" else (f"[image: {url}]", False)
    if kind == "input_audio":
        fmt = part["input_audio"].get("format")
        return (f"[audio: {fmt}]" if isinstance(fmt, str) and fmt else "[audio]"), False
    if kind == "file":
        info = part["file"]
        name = next(
            (info[k] for k in ("filename", "file_id") if isinstance(info.get(k), str) and info[k]),
            None,
        )
        return (f"[file: {name}]" if name else "[file]"), False
    return f"[{kind}]", False


def _call_text(call: Mapping[str, Any]) -> str:
    kind = call.get("type", "function")
    if kind == "function":
        return f"{call['function']['name']}({call['function']['arguments']})"
    if kind == "custom":
        return f"{call['custom']['name']}({call['custom'].get('input', '')})"
    return f"[{kind} tool call]"


def _cut(text: str) -> str:
    return text if len(text) <= LABEL_DETAIL_CHARS else text[: LABEL_DETAIL_CHARS - 1] + "\u2026"


# --- lone surrogates ---------------------------------------------------------------------
def surrogate_error(text: str) -> str | None:
    """None for text that is valid Unicode, else what is wrong ("contains a lone surrogate
    U+D83D at character 5, ..."), to follow the name of the text in an error."""
    return _surrogate_in(text) if _has_surrogate(text) else None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _surrogate_in(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"contains a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}, "
            "which is not valid Unicode text (is it half of a split emoji?)"
        )
    return "is valid"


def _surrogate(value: Any, path: str = "") -> str:
    """Where the first lone surrogate of a message is, e.g. "content[1].text contains ..."."""
    if isinstance(value, str):
        return f"{path or 'the message'} {_surrogate_in(value)}" if _has_surrogate(value) else ""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if _has_surrogate(key):
                return f"the field name {key!r} {_surrogate_in(key)}"
            found = _surrogate(item, f"{path}.{key}" if path else key)
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            found = _surrogate(item, f"{path}[{j}]")
            if found:
                return found
    return ""


# --- sending stored messages to a chat model -------------------------------------------------
def chat_messages(messages: Sequence[Message | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Stored messages made fit to send to a Chat Completions API, as close to as given as
    the API allows: only the fields of the message format (CHAT_FIELDS; extra fields of a log
    stay in the store); an assistant message's `tool_calls` only together with the tool
    messages that answer every call right after it, else both as plain text (the render
    text): a tool result whose call is no longer in the list, or calls without their
    answers, would be refused; the legacy `function_call` and `function` role as text."""
    msgs = [parse_message(m, f"message {i}") for i, m in enumerate(messages)]
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(msgs):
        m = msgs[i]
        data = {k: v for k, v in m.to_dict().items() if k in CHAT_FIELDS}
        if m.role == "assistant" and data.get("tool_calls"):
            ids = [c.get("id") for c in data["tool_calls"]]
            j = i + 1
            while j < len(msgs) and msgs[j].role == "tool":
                j += 1
            answers = [msgs[k].to_dict().get("tool_call_id") for k in range(i + 1, j)]
            if (
                data.get("function_call") is None
                and sorted(map(str, ids)) == sorted(map(str, answers))
                and all(isinstance(x, str) for x in ids)
            ):
                out.append(data)
                out.extend(
                    {k: v for k, v in msgs[k].to_dict().items() if k in CHAT_FIELDS}
                    for k in range(i + 1, j)
                )
                i = j
                continue
        if m.role == "assistant" and (data.get("tool_calls") or data.get("function_call")):
            out.append({"role": "assistant", "content": m.text})
        elif m.role in ("tool", "function"):
            label = f"[{m.role} {m.label_detail}]" if m.label_detail else f"[{m.role}]"
            out.append({"role": "user", "content": f"{label} {m.text}"})
        else:
            data.pop("tool_calls", None)
            out.append(data)
        i += 1
    return out


def load_transcript(source: str | Path) -> list[Message]:
    """Messages from a JSONL file, a JSON array file, or "-" (standard input).

    The format is detected from the first non-blank character: "[" means a JSON
    array, anything else JSONL. A UTF-8 byte order mark is skipped; invalid UTF-8
    is an error naming its line, not replaced. A "turn_id" field of a message
    becomes its `turn_id` (the idempotency key `OpticalMemory.extend` honours).
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
    # lines end at "\n" only: other line breaks (U+2028, U+0085, ...) may stand unescaped in JSON
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name}: line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MessageError(f"{where}: not JSON: {exc.msg} (column {exc.colno})") from None
        messages.append(_checked(parse_message(obj, where), where))
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
    return [
        _checked(parse_message(obj, f"{name}: message {i}"), f"{name}: message {i}")
        for i, obj in enumerate(data)
    ]


def _checked(message: Message, where: str) -> Message:
    """The message, its data-URL images decoded (any size; the memory bounds them)."""
    message.check_images(where, None)
    return message


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
