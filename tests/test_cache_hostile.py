"""Hostile vision-cache entries (issue 13, part 4): whatever a store holds is checked.

Each entry here is crafted with a correct SHA-256 (the framing is sound, the content is not):
reading it is a miss, the entry is gone from the store afterwards, nothing raises, and through
`OpticalMemory.context()` the page is encoded again and equals a clean encode. Both stores.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import time
import zlib
from collections.abc import Callable

import pytest
import torch
from PIL import Image

from optical_memory import cache as cache_module
from optical_memory.cache import (
    _PREFIX,
    IMAGE_MODE,
    MAGIC,
    MAX_IMAGE_SIDE,
    PNG_SIGNATURE,
    VERSION,
    VisionCache,
    cache_key,
    image_to_bytes,
    pack,
    png_to_bytes,
    tensor_to_bytes,
)
from optical_memory.memory import OpticalMemory
from optical_memory.modes import get_mode
from optical_memory.policy import Policy, Schedule

STORE_ON_CLUSTER = True  # the store fixtures run on a Redis Cluster too (conftest)
KEY = cache_key("pagehash", "renderfp", "tiny", "modelfp")
OTHER_KEY = cache_key("otherpage", "renderfp", "tiny", "modelfp")
SHAPE = (get_mode("tiny").vision_tokens(), 48)  # [73, 48]: a tiny page of a 48-wide encoder
POLICY = Policy(
    schedule=Schedule(((1000, "tiny"),)), recent_turns=3, recent_tokens=120, answer_tokens=8
)


def frame(header: object, payload: bytes) -> bytes:
    """An entry with any header at all (pack() only writes sound ones)."""
    raw = json.dumps(header).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(raw)) + raw + payload


def sound_header(key: str, dtype: object, shape: object, payload: bytes) -> dict:
    return {
        "key": key,
        "dtype": dtype,
        "shape": shape,
        "sha256": hashlib.sha256(payload).hexdigest(),
    }


def clean_tensor() -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0))


def short_payload(key: str) -> bytes:
    payload = clean_tensor().reshape(-1)[:100].numpy().tobytes()
    return pack(key, "float32", SHAPE, payload)  # checksum right, too few bytes for the shape


# name -> key -> value; every value's checksum matches its payload unless the case is truncation
TENSOR_CASES: dict[str, Callable[[str], bytes]] = {
    "shape [2,-2,-1]": lambda k: frame(
        sound_header(k, "float32", [2, -2, -1], b"\0" * 16), b"\0" * 16
    ),
    "[1,4] tensor under a page key": lambda k: tensor_to_bytes(k, torch.ones(1, 4)),
    "transposed page tensor": lambda k: tensor_to_bytes(k, clean_tensor().T.contiguous()),
    "page tensor with a batch dimension": lambda k: tensor_to_bytes(k, clean_tensor()[None]),
    "huge dims with no payload": lambda k: frame(sound_header(k, "float32", [2**62, 0], b""), b""),
    "dims past int64": lambda k: frame(sound_header(k, "float32", [2**80, 2**80], b""), b""),
    "float dims": lambda k: frame(sound_header(k, "float32", [73.0, 48.0], b""), b""),
    "bool dims": lambda k: frame(sound_header(k, "float32", [True, 48], b"\0" * 192), b"\0" * 192),
    "shape not a list": lambda k: frame(sound_header(k, "float32", "73x48", b""), b""),
    "float64 entry": lambda k: pack(k, "float64", SHAPE, clean_tensor().double().numpy().tobytes()),
    "unknown dtype": lambda k: pack(k, "complex_half", SHAPE, b"\0" * (SHAPE[0] * SHAPE[1] * 4)),
    "dtype not a string": lambda k: frame(sound_header(k, ["float32"], list(SHAPE), b""), b""),
    "bfloat16 for a float32 encoder": lambda k: tensor_to_bytes(k, clean_tensor().bfloat16()),
    "checksum right, payload short": short_payload,
    "truncated payload": lambda k: tensor_to_bytes(k, clean_tensor())[:-100],
    "truncated header": lambda k: tensor_to_bytes(k, clean_tensor())[:30],
    "header length past the end": lambda k: _PREFIX.pack(MAGIC, VERSION, 2**31) + b"{}",
    "header not an object": lambda k: frame([k, "float32"], b""),
    "header nested too deep": lambda k: (
        _PREFIX.pack(MAGIC, VERSION, 200_000) + b"[" * 100_000 + b"]" * 100_000
    ),
    "entry for another key": lambda k: tensor_to_bytes(OTHER_KEY, clean_tensor()),
    "image entry under a page key": lambda k: image_to_bytes(k, Image.new("RGB", (8, 8))),
}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, idat: bytes | None = None, extra: bytes = b"") -> bytes:
    """A PNG whose IHDR says width x height, with a few bytes of pixel data: a 13000x13000
    header costs nothing to write; it would cost 500 MB and seconds to decode."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 64) if idat is None else idat
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )


def valid_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_CASES: dict[str, Callable[[str], bytes]] = {
    "13000x13000 PNG": lambda k: pack(k, "png", (13000, 13000), crafted_png(13000, 13000)),
    "header small, IHDR 13000x13000": lambda k: pack(k, "png", (64, 64), crafted_png(13000, 13000)),
    "1x200000 PNG": lambda k: pack(k, "png", (1, 200_000), crafted_png(200_000, 1)),
    "zero-sized PNG": lambda k: pack(k, "png", (0, 0), crafted_png(0, 0)),
    "second IHDR": lambda k: pack(
        k,
        "png",
        (64, 64),
        crafted_png(
            64, 64, extra=png_chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0))
        ),
    ),
    "corrupt pixel data": lambda k: pack(
        k, "png", (64, 64), crafted_png(64, 64, idat=b"garbage!" * 8)
    ),
    "not a PNG": lambda k: pack(k, "png", (64, 64), b"GIF89a" + b"\0" * 64),
    "PNG of another size than the page": lambda k: pack(k, "png", (32, 48), valid_png(48, 32)),
    "tensor entry under an image key": lambda k: tensor_to_bytes(k, clean_tensor()),
    "truncated image": lambda k: image_to_bytes(k, Image.new("RGB", (64, 64)))[:-20],
    "image for another key": lambda k: image_to_bytes(OTHER_KEY, Image.new("RGB", (64, 64))),
}


# --------------------------------------------------------------------------- the cache itself
@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_hostile_tensor_entry_is_a_miss_and_dropped(store, case):
    cache = VisionCache(store)
    store.cache_put("s", KEY, TENSOR_CASES[case](KEY))
    assert cache.get_tensor("s", KEY, shape=SHAPE, dtypes=("float32",)) is None
    assert store.cache_get("s", KEY) is None  # dropped, not read again on every call
    assert cache.get_tensor("s", KEY, shape=SHAPE, dtypes=("float32",)) is None


def test_sound_entry_passes_the_same_checks(store):
    cache = VisionCache(store)
    t = clean_tensor()
    cache.put_tensor("s", KEY, t)
    assert torch.equal(cache.get_tensor("s", KEY, shape=SHAPE, dtypes=("float32",)), t)
    assert store.cache_get("s", KEY) is not None


def test_any_failure_to_decode_is_a_miss(store, monkeypatch):
    """Whatever decoding raises (here a RuntimeError, as torch's reshape did for [2,-2,-1])
    drops the entry; it never reaches the caller."""
    cache = VisionCache(store)
    cache.put_tensor("s", KEY, clean_tensor())

    def explode(*args, **kwargs):
        raise RuntimeError("shape '[2, -2, -1]' is invalid")

    monkeypatch.setattr(cache_module, "tensor_from_bytes", explode)
    assert cache.get_tensor("s", KEY, shape=SHAPE) is None
    assert store.cache_get("s", KEY) is None


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_hostile_image_entry_is_a_miss_and_dropped(store, case):
    cache = VisionCache(store)
    store.cache_put("s", KEY, IMAGE_CASES[case](KEY))
    start = time.perf_counter()
    assert cache.get_image("s", KEY, size=(64, 64)) is None
    elapsed = time.perf_counter() - start
    print(f"{case}: refused in {elapsed * 1000:.2f} ms")
    assert store.cache_get("s", KEY) is None


def test_huge_png_is_refused_before_decoding(store, monkeypatch):
    """The 13000x13000 entry is refused from its IHDR: Pillow never opens it (the issue saw
    630 MiB and 2 s per read). Timing is printed, not asserted."""
    cache = VisionCache(store)
    opened: list[object] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    for size in (None, (13000, 13000)):
        store.cache_put("s", KEY, pack(KEY, "png", (13000, 13000), crafted_png(13000, 13000)))
        start = time.perf_counter()
        assert cache.get_image("s", KEY, size=size) is None
        print(f"13000x13000 PNG refused in {(time.perf_counter() - start) * 1000:.2f} ms")
        assert store.cache_get("s", KEY) is None
    assert opened == []
    assert 13000 > MAX_IMAGE_SIDE


def test_sound_image_passes_the_same_checks(store):
    cache = VisionCache(store)
    img = Image.new("RGB", (64, 64), "white")
    cache.put_image("s", KEY, img)
    back = cache.get_image("s", KEY, size=(64, 64))
    assert back is not None and back.tobytes() == img.tobytes()


def test_hostile_png_base64_entries_are_dropped(store):
    cache = VisionCache(store)
    huge, ok = cache_key("p", "r", "png-13000x13000", ""), cache_key("p", "r", "png-64x64", "")
    store.cache_put("s", huge, png_to_bytes(huge, crafted_png(13000, 13000), (13000, 13000)))
    cache.put_png("s", ok, valid_png(64, 64), (64, 64))
    found = cache.get_pngs("s", [huge, ok])
    assert list(found) == [ok] and base64.b64decode(found[ok]) == valid_png(64, 64)
    assert store.cache_get("s", huge) is None


# --------------------------------------------------------------------------- through the memory
@pytest.fixture(scope="module")
def model(checkpoint):
    from optical_memory.backends.deepseek_ocr import load_model

    return load_model(checkpoint, "cpu", torch.float32)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, model, conversation):
    """A clean run: the context's page embeddings and every cache entry it wrote."""
    mem = OpticalMemory(tmp_path_factory.mktemp("clean") / "m.sqlite3", model=model, policy=POLICY)
    mem.extend("s", conversation(30))
    ctx = mem.context("s", "q")
    pages = ctx.plan.in_context()
    records = {r.index: r for r in mem.pages("s")}
    keys = []
    for p in pages:
        r = records[p.index]
        keys.append(cache_key(p.content_hash, r.fingerprint, p.mode, model.encoder.cache_id))
        keys.append(cache_key(r.content_hash, r.fingerprint, IMAGE_MODE, ""))
    entries = {k: v for k in keys if (v := mem.store.cache_get("s", k)) is not None}
    page = pages[0]
    record = records[page.index]
    assert record.sealed  # so its image is cached too
    return {
        "segments": ctx.segments,
        "pages": len(pages),
        "entries": entries,
        "tensor_key": keys[0],
        "image_key": keys[1],
        "image": mem.page_image("s", record),
    }


def memory_with_clean_cache(store, model, conversation, clean) -> OpticalMemory:
    mem = OpticalMemory(store, model=model, policy=POLICY)
    mem.extend("s", conversation(30))
    for key, value in clean["entries"].items():
        store.cache_put("s", key, value)
    return mem


def assert_clean(ctx, clean) -> None:
    assert len(ctx.segments) == len(clean["segments"])
    for got, want in zip(ctx.segments, clean["segments"]):
        if isinstance(want, torch.Tensor):
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            assert got == want


MEMORY_TENSOR_CASES = [
    "shape [2,-2,-1]",
    "[1,4] tensor under a page key",
    "float64 entry",
    "unknown dtype",
    "checksum right, payload short",
    "truncated payload",
    "entry for another key",
]


@pytest.mark.parametrize("case", MEMORY_TENSOR_CASES)
def test_context_encodes_the_page_again(store, model, conversation, clean, case):
    mem = memory_with_clean_cache(store, model, conversation, clean)
    key = clean["tensor_key"]
    store.cache_put("s", key, TENSOR_CASES[case](key))
    misses = store.info("s").cache_misses
    ctx = mem.context("s", "q")
    assert ctx.encoded == 1  # the hostile entry was a miss; the other pages came from the cache
    assert store.info("s").cache_misses == misses + 1
    assert_clean(ctx, clean)
    assert store.cache_get("s", key) == clean["entries"][key]  # cached again, soundly
    assert mem.context("s", "q").encoded == 0


@pytest.mark.parametrize(
    "case", ["13000x13000 PNG", "header small, IHDR 13000x13000", "second IHDR"]
)
def test_context_renders_and_encodes_the_page_again(store, model, conversation, clean, case):
    mem = memory_with_clean_cache(store, model, conversation, clean)
    image_key, tensor_key = clean["image_key"], clean["tensor_key"]
    store.cache_put("s", image_key, IMAGE_CASES[case](image_key))
    store.cache_delete("s", tensor_key)  # so that encoding needs the page image
    ctx = mem.context("s", "q")
    assert ctx.encoded == 1
    assert_clean(ctx, clean)
    cached = store.cache_get("s", image_key)
    assert cached is not None and cached != IMAGE_CASES[case](image_key)  # rendered again
    page = next(r for r in mem.pages("s") if r.sealed)
    assert mem.page_image("s", page).tobytes() == clean["image"].tobytes()


def test_hostile_cache_leaves_the_context_whole(store, model, conversation, clean):
    """Every cached entry poisoned at once: every page is rendered and encoded again, the
    same as clean."""
    mem = memory_with_clean_cache(store, model, conversation, clean)
    assert mem.context("s", "q").encoded == 0
    for i, key in enumerate(clean["entries"]):  # page tensors and page images alike
        case = MEMORY_TENSOR_CASES[i % len(MEMORY_TENSOR_CASES)]
        store.cache_put("s", key, TENSOR_CASES[case](key))
    ctx = mem.context("s", "q")
    assert ctx.encoded == clean["pages"]
    assert_clean(ctx, clean)
    assert mem.context("s", "q").encoded == 0
