"""The vision-token cache: encoded pages (and their rendered images), kept in the store.

A key names everything the value depends on: the page's content hash, the
render configuration's fingerprint, the mode and the model's fingerprint. A
value is a small JSON header (its key, dtype, shape, SHA-256 of the payload)
followed by the raw bytes; it is never pickled. An entry that does not match
its key or its checksum is dropped and counted as a miss, so the caller
recomputes it from the text: the cache can lose anything and memory loses nothing.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import struct
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from optical_memory.stores.base import Store

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAGIC = b"OMVC"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
TENSOR_DTYPES = ("float32", "float16", "bfloat16")
IMAGE_MODE = "page-png"  # the `mode` of a rendered page image's entry


class CacheEntryError(ValueError):
    """A cache value that cannot be trusted (truncated, altered, or for another key)."""


def cache_key(page_hash: str, render_fingerprint: str, mode: str, model_fingerprint: str) -> str:
    parts = json.dumps([page_hash, render_fingerprint, mode, model_fingerprint])
    return hashlib.sha256(parts.encode()).hexdigest()[:40]


def pack(key: str, dtype: str, shape: tuple[int, ...], payload: bytes) -> bytes:
    header = json.dumps(
        {"key": key, "dtype": dtype, "shape": list(shape), "sha256": hashlib.sha256(payload).hexdigest()}
    ).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload


def unpack(key: str, value: bytes) -> tuple[str, tuple[int, ...], memoryview]:
    """(dtype, shape, payload) of a packed value; CacheEntryError if anything is off.

    The payload is a view into `value` (no copy of megabytes of pixels)."""
    if len(value) < _PREFIX.size:
        raise CacheEntryError("entry shorter than its header")
    magic, version, size = _PREFIX.unpack_from(value)
    if magic != MAGIC or version != VERSION:
        raise CacheEntryError(f"unknown entry format {magic!r} v{version}")
    try:
        header: dict[str, Any] = json.loads(value[_PREFIX.size : _PREFIX.size + size])
        dtype, shape, digest = header["dtype"], tuple(header["shape"]), header["sha256"]
        stored_key = header["key"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheEntryError(f"unreadable entry header: {exc}") from None
    if stored_key != key:
        raise CacheEntryError(f"entry is for key {stored_key!r}")
    payload = memoryview(value)[_PREFIX.size + size :]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CacheEntryError("payload checksum mismatch")
    return dtype, shape, payload


def tensor_to_bytes(key: str, tensor: torch.Tensor) -> bytes:
    import torch

    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in TENSOR_DTYPES:
        raise TypeError(f"cannot cache a {dtype} tensor; cacheable dtypes: {TENSOR_DTYPES}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    payload = flat.view(torch.uint8).numpy().tobytes()
    return pack(key, dtype, tuple(tensor.shape), payload)


def tensor_from_bytes(key: str, value: bytes) -> torch.Tensor:
    import torch

    dtype, shape, payload = unpack(key, value)
    if dtype not in TENSOR_DTYPES:
        raise CacheEntryError(f"entry holds dtype {dtype!r}, not a tensor")
    torch_dtype = getattr(torch, dtype)
    if len(payload) != math.prod(shape) * torch_dtype.itemsize:
        raise CacheEntryError(f"payload of {len(payload)} bytes does not hold shape {list(shape)}")
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return raw.view(torch_dtype).reshape(shape)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(image: Image.Image) -> bytes:
    """Deterministic PNG bytes of an image (no metadata), as sent to chat models.

    A grey image (every rendered page: the renderer draws grey ink) is stored as one
    8-bit channel, half the bytes of RGB for the same pixels.
    """
    if image.mode == "RGB":
        pixels = np.asarray(image)
        if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all():
            image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def png_to_bytes(key: str, png: bytes, size: tuple[int, int]) -> bytes:
    """A PNG entry: the PNG in base64, ready for a data URL without encoding it on every read."""
    width, height = size
    return pack(key, "png-base64", (height, width), base64.b64encode(png))


def png_from_bytes(key: str, value: bytes) -> str:
    """The base64 text of a PNG entry, checked without decoding it whole: its checksum,
    ASCII, and a PNG signature and IHDR size that match the header. (It is only ever
    sent inside a JSON string, so a hostile entry can at worst be an unreadable image.)"""
    dtype, shape, payload = unpack(key, value)
    if dtype != "png-base64":
        raise CacheEntryError(f"entry holds {dtype!r}, not a PNG image")
    try:
        head = base64.b64decode(bytes(payload[:32]), validate=True)
        text = str(payload, "ascii")
    except (ValueError, UnicodeDecodeError):
        raise CacheEntryError("payload is not base64") from None
    if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise CacheEntryError("payload is not a PNG")
    width, height = struct.unpack(">II", head[16:24])
    if (height, width) != shape:
        raise CacheEntryError(f"PNG is {width}x{height}, header says {list(shape)}")
    return text


def image_to_bytes(key: str, image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=1)
    return pack(key, "png", (image.height, image.width), buffer.getvalue())


def image_from_bytes(key: str, value: bytes) -> Image.Image:
    dtype, shape, payload = unpack(key, value)
    if dtype != "png":
        raise CacheEntryError(f"entry holds {dtype!r}, not a PNG image")
    try:
        image = Image.open(io.BytesIO(payload))
        image.load()
    except (OSError, Image.DecompressionBombError) as exc:
        raise CacheEntryError(f"unreadable PNG: {exc}") from None
    if (image.height, image.width) != shape:
        raise CacheEntryError(f"image is {image.width}x{image.height}, header says {shape}")
    return image.convert("RGB")


class VisionCache:
    """Cached page embeddings and page images of the sessions of one store."""

    def __init__(self, store: Store):
        self.store = store

    def _get(self, session_id: str, key: str, decode: Any) -> Any:
        value = self.store.cache_get(session_id, key)
        return None if value is None else self._decode(session_id, key, value, decode)

    def _decode(self, session_id: str, key: str, value: bytes, decode: Any) -> Any:
        try:
            return decode(key, value)
        except CacheEntryError as exc:
            log.warning("dropping cache entry %s of session %r: %s", key, session_id, exc)
            self.store.cache_delete(session_id, key)
            return None

    def get_tensor(self, session_id: str, key: str) -> torch.Tensor | None:
        return self._get(session_id, key, tensor_from_bytes)

    def put_tensor(self, session_id: str, key: str, tensor: torch.Tensor) -> int:
        """Store a tensor; returns the bytes it takes."""
        value = tensor_to_bytes(key, tensor)
        self.store.cache_put(session_id, key, value)
        return len(value)

    def get_image(self, session_id: str, key: str) -> Image.Image | None:
        return self._get(session_id, key, image_from_bytes)

    def put_image(self, session_id: str, key: str, image: Image.Image) -> int:
        value = image_to_bytes(key, image)
        self.store.cache_put(session_id, key, value)
        return len(value)

    def get_pngs(self, session_id: str, keys: list[str]) -> dict[str, str]:
        """The PNGs (as base64 text) of `keys` that are cached and sound, in one round trip."""
        found = self.store.cache_get_many(session_id, keys)
        pngs = {k: self._decode(session_id, k, v, png_from_bytes) for k, v in found.items()}
        return {k: png for k, png in pngs.items() if png is not None}

    def put_png(self, session_id: str, key: str, png: bytes, size: tuple[int, int]) -> int:
        value = png_to_bytes(key, png, size)
        self.store.cache_put(session_id, key, value)
        return len(value)
