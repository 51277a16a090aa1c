"""The vision-token cache: encoded pages (and their rendered images), kept in the store.

A key names everything the value depends on: the page's content hash, the
render configuration's fingerprint, the mode and the model's fingerprint. A
value is a small JSON header (its key, dtype, shape, SHA-256 of the payload)
followed by the raw bytes; it is never pickled. A store may hold anything, so
an entry is trusted only as far as it is checked: its key, checksum, dtype and
shape must be those its key implies (the caller says which: a page's tensor is
[vision tokens of the page at its mode, encoder width] in the encoder's dtype),
and an image's size is read from its PNG header and bounded before Pillow
decodes it. An entry that fails any check, or fails to decode in any way, is
dropped from the store and counted as a miss, so the caller recomputes it from
the text: the cache can lose anything and memory loses nothing.
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
MAX_DIMS = 8  # dimensions of a header's shape
MAX_DIM = 2**31 - 1  # one dimension of a header's shape
# Page images: a Gundam canvas is a multiple of its 640 px tile, at most 9 tiles; 8192 px a
# side and 40 Mpx (120 MB of RGB) leave room for any page while a hostile header cannot make
# a read allocate gigabytes.
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 40_000_000


class CacheEntryError(ValueError):
    """A cache value that cannot be trusted (truncated, altered, or for another key)."""


def cache_key(page_hash: str, render_fingerprint: str, mode: str, model_fingerprint: str) -> str:
    parts = json.dumps([page_hash, render_fingerprint, mode, model_fingerprint])
    return hashlib.sha256(parts.encode()).hexdigest()[:40]


def page_image_key(page_hash: str, render_fingerprint: str) -> str:
    """The key of a rendered page image's entry (the same for every mode and model)."""
    return cache_key(page_hash, render_fingerprint, IMAGE_MODE, "")


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
    if _PREFIX.size + size > len(value):
        raise CacheEntryError("entry shorter than its header")
    try:
        header: dict[str, Any] = json.loads(bytes(value[_PREFIX.size : _PREFIX.size + size]))
        dtype, raw_shape, digest = header["dtype"], header["shape"], header["sha256"]
        stored_key = header["key"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CacheEntryError(f"unreadable entry header: {exc}") from None
    if stored_key != key:
        raise CacheEntryError(f"entry is for key {str(stored_key)[:80]!r}")
    if not isinstance(dtype, str) or not isinstance(digest, str):
        raise CacheEntryError("unreadable entry header: dtype and sha256 must be strings")
    shape = _checked_shape(raw_shape)
    payload = memoryview(value)[_PREFIX.size + size :]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CacheEntryError("payload checksum mismatch")
    return dtype, shape, payload


def _checked_shape(shape: Any) -> tuple[int, ...]:
    """A header's shape: a list of at most MAX_DIMS integers in [0, MAX_DIM]."""
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise CacheEntryError(f"bad shape in entry header: {str(shape)[:80]}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DIM:
            raise CacheEntryError(f"bad shape in entry header: {str(shape)[:80]}")
    return tuple(shape)


def tensor_to_bytes(key: str, tensor: torch.Tensor) -> bytes:
    import torch

    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in TENSOR_DTYPES:
        raise TypeError(f"cannot cache a {dtype} tensor; cacheable dtypes: {TENSOR_DTYPES}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    payload = flat.view(torch.uint8).numpy().tobytes()
    return pack(key, dtype, tuple(tensor.shape), payload)


def tensor_from_bytes(
    key: str,
    value: bytes,
    *,
    shape: tuple[int, ...] | None = None,
    dtypes: tuple[str, ...] | None = None,
) -> torch.Tensor:
    """The tensor of an entry. `shape` and `dtypes`, when given, are what the key implies:
    an entry of any other shape or dtype is refused (CacheEntryError) before anything is
    allocated for it."""
    import torch

    dtype, stored_shape, payload = unpack(key, value)
    if dtype not in TENSOR_DTYPES:
        raise CacheEntryError(f"entry holds dtype {dtype[:40]!r}, not a tensor")
    if dtypes is not None and dtype not in dtypes:
        raise CacheEntryError(f"entry holds dtype {dtype}, expected {' or '.join(dtypes)}")
    if shape is not None and stored_shape != tuple(shape):
        raise CacheEntryError(f"entry has shape {list(stored_shape)}, expected {list(shape)}")
    shape = stored_shape
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
    _check_image_size(width, height)
    return text


def _check_image_size(width: int, height: int, size: tuple[int, int] | None = None) -> None:
    if size is not None and (width, height) != tuple(size):
        raise CacheEntryError(f"image is {width}x{height}, expected {size[0]}x{size[1]}")
    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE) or (
        width * height > MAX_IMAGE_PIXELS
    ):
        raise CacheEntryError(
            f"image of {width}x{height} is past the bound of {MAX_IMAGE_SIDE} px a side "
            f"and {MAX_IMAGE_PIXELS} pixels"
        )


def png_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk, without decoding anything.

    The chunk headers up to the pixel data are walked too: one IHDR only (Pillow would take
    the size of a later one), every chunk inside the payload."""
    head = bytes(data[:24])
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise CacheEntryError("payload is not a PNG")
    width, height = struct.unpack(">II", head[16:24])
    offset = len(PNG_SIGNATURE)
    for _ in range(_MAX_PNG_CHUNKS):
        if offset + 8 > len(data):
            raise CacheEntryError("PNG ends inside a chunk header")
        length, kind = struct.unpack(">I4s", bytes(data[offset : offset + 8]))
        if kind == b"IHDR" and offset != len(PNG_SIGNATURE):
            raise CacheEntryError("PNG has a second IHDR chunk")
        if kind in (b"IDAT", b"IEND"):
            return width, height
        offset += 12 + length
    raise CacheEntryError(f"PNG has more than {_MAX_PNG_CHUNKS} chunks before its pixels")


_MAX_PNG_CHUNKS = 1000  # ancillary chunks before the first IDAT


def image_to_bytes(key: str, image: Image.Image) -> bytes:
    """A PNG entry; an RGB image whose channels are equal (a rendered page) is stored as
    gray: a third of the bytes, and a third of the work to decode and resize."""
    if image.mode == "RGB":
        red, green, blue = (band.tobytes() for band in image.split())
        if red == green == blue:
            image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=1)
    return pack(key, "png", (image.height, image.width), buffer.getvalue())


def image_from_bytes(
    key: str, value: bytes, *, size: tuple[int, int] | None = None, gray: bool = False
) -> Image.Image:
    """The RGB image of a PNG entry (with `gray`, an "L" image where the entry is gray). Its
    size is read from the PNG's IHDR chunk and checked against the entry's header, `size`
    (width, height: what the key implies) when given, and the bounds (MAX_IMAGE_SIDE,
    MAX_IMAGE_PIXELS) before Pillow decodes anything."""
    dtype, shape, payload = unpack(key, value)
    if dtype != "png":
        raise CacheEntryError(f"entry holds {dtype[:40]!r}, not a PNG image")
    width, height = png_size(payload)
    if (height, width) != shape:
        raise CacheEntryError(f"PNG is {width}x{height}, header says {list(shape)}")
    _check_image_size(width, height, size)
    try:
        image = Image.open(io.BytesIO(payload), formats=["PNG"])
        if image.size != (width, height):  # a second IHDR chunk
            raise CacheEntryError(f"PNG decodes to {image.size}, its IHDR says {width}x{height}")
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, CacheEntryError):
            raise
        raise CacheEntryError(f"unreadable PNG: {exc}") from None
    return image if gray and image.mode == "L" else image.convert("RGB")


class VisionCache:
    """Cached page embeddings and page images of the sessions of one store."""

    def __init__(self, store: Store):
        self.store = store

    def _get(self, session_id: str, key: str, decode: Any) -> Any:
        value = self.store.cache_get(session_id, key)
        return None if value is None else self._decode(session_id, key, value, decode)

    def _decode(self, session_id: str, key: str, value: bytes, decode: Any) -> Any:
        """`decode(key, value)`, or None after dropping the entry: whatever a hostile entry
        makes decoding raise (not only CacheEntryError) is a miss, never the caller's error."""
        try:
            return decode(key, value)
        except Exception as exc:  # noqa: BLE001 (anything read from a store may be hostile)
            log.warning(
                "dropping cache entry %s of session %r: %s: %s",
                key, session_id, type(exc).__name__, str(exc)[:200],
            )
        self.store.cache_delete(session_id, key)
        return None

    def get_tensor(
        self,
        session_id: str,
        key: str,
        *,
        shape: tuple[int, ...] | None = None,
        dtypes: tuple[str, ...] | None = None,
    ) -> torch.Tensor | None:
        """The cached tensor, or None (a miss). `shape` and `dtypes` are what the key implies
        (see `tensor_from_bytes`); an entry of another shape or dtype is dropped."""
        return self._get(
            session_id, key, lambda k, v: tensor_from_bytes(k, v, shape=shape, dtypes=dtypes)
        )

    def get_tensors(
        self,
        session_id: str,
        shapes: dict[str, tuple[int, ...]],
        *,
        dtypes: tuple[str, ...] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`get_tensor` of each key of `shapes` (key -> the shape it implies) in one read; the
        hits only."""
        found = self.store.cache_get_many(session_id, list(shapes))
        decoded = {
            key: self._decode(
                session_id, key, value,
                lambda k, v: tensor_from_bytes(k, v, shape=shapes[k], dtypes=dtypes),
            )
            for key, value in found.items()
        }
        return {key: tensor for key, tensor in decoded.items() if tensor is not None}

    def get_entries(self, session_id: str, keys: list[str]) -> dict[str, bytes]:
        """The stored values of `keys` that are present, unchecked, in one read: for a reader
        that checks them itself (a view process decoding page images)."""
        return self.store.cache_get_many(session_id, keys)

    def put_tensor(self, session_id: str, key: str, tensor: torch.Tensor) -> int:
        """Store a tensor; returns the bytes it takes."""
        return self.put_tensors(session_id, [(key, tensor)])

    def put_tensors(self, session_id: str, items: list[tuple[str, torch.Tensor]]) -> int:
        """Store (key, tensor) pairs in one write; returns the bytes they take."""
        values = [(key, tensor_to_bytes(key, tensor)) for key, tensor in items]
        self.store.cache_put_many(session_id, values)
        return sum(len(value) for _, value in values)

    def get_image(
        self, session_id: str, key: str, *, size: tuple[int, int] | None = None
    ) -> Image.Image | None:
        """The cached image, or None (a miss); `size` (width, height) is what the key implies."""
        return self._get(session_id, key, lambda k, v: image_from_bytes(k, v, size=size))

    def put_image(self, session_id: str, key: str, image: Image.Image) -> int:
        """Store an image; returns the bytes it takes (0: past the bounds, not cached)."""
        if not (
            image.width <= MAX_IMAGE_SIDE
            and image.height <= MAX_IMAGE_SIDE
            and image.width * image.height <= MAX_IMAGE_PIXELS
        ):
            return 0  # it would be refused when read
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
