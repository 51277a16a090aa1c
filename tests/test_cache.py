import io

import pytest
import torch
from PIL import Image, ImageDraw

from optical_memory.cache import (
    CacheEntryError,
    VisionCache,
    cache_key,
    tensor_from_bytes,
    tensor_to_bytes,
)
from optical_memory.stores import CacheLimits

KEY = cache_key("pagehash", "renderfp", "base", "modelfp")

STORE_ON_CLUSTER = True  # the store fixtures run on a Redis Cluster too (conftest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_round_trip_is_bit_exact(dtype):
    t = torch.randn(273, 1280, generator=torch.Generator().manual_seed(0)).to(dtype)
    back = tensor_from_bytes(KEY, tensor_to_bytes(KEY, t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_key_names_every_input():
    keys = {
        cache_key(*parts)
        for parts in [
            ("p", "r", "base", "m"),
            ("p2", "r", "base", "m"),
            ("p", "r2", "base", "m"),
            ("p", "r", "tiny", "m"),
            ("p", "r", "base", "m2"),
        ]
    }
    assert len(keys) == 5


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda v: v[:10], "shorter|header"),
        (lambda v: b"XXXX" + v[4:], "format"),
        (lambda v: v[:-1] + bytes([v[-1] ^ 1]), "checksum"),
        (lambda v: v[:-8], "checksum"),
        (lambda v: v.replace(b'"key"', b'"kex"', 1), "header"),
    ],
)
def test_damaged_entries_are_detected(damage, message):
    value = tensor_to_bytes(KEY, torch.ones(4, 8))
    with pytest.raises(CacheEntryError, match=message):
        tensor_from_bytes(KEY, damage(value))


def test_entry_under_another_key_is_detected():
    value = tensor_to_bytes(KEY, torch.ones(2, 2))
    with pytest.raises(CacheEntryError, match="for key"):
        tensor_from_bytes(cache_key("other", "r", "base", "m"), value)


def test_unsupported_dtype_is_refused():
    with pytest.raises(TypeError, match="int64"):
        tensor_to_bytes(KEY, torch.ones(2, dtype=torch.int64))


def test_store_backed_cache_drops_corrupt_entries(store):
    cache = VisionCache(store)
    t = torch.randn(73, 1280)
    size = cache.put_tensor("s", KEY, t)
    assert size > 73 * 1280 * 4
    assert torch.equal(cache.get_tensor("s", KEY), t)
    raw = bytearray(store.cache_get("s", KEY))
    raw[-3] ^= 0xFF
    store.cache_put("s", KEY, bytes(raw))
    assert cache.get_tensor("s", KEY) is None  # detected and dropped
    assert store.cache_get("s", KEY) is None
    assert cache.get_tensor("s", "absent") is None


def test_images_round_trip_through_the_store(store):
    cache = VisionCache(store)
    img = Image.new("RGB", (320, 200), "white")
    ImageDraw.Draw(img).text((10, 10), "page 1", fill="black")
    key = cache_key("p", "r", "page-png", "")
    cache.put_image("s", key, img)
    back = cache.get_image("s", key)
    assert back.size == (320, 200) and back.tobytes() == img.tobytes()
    # a tensor entry read as an image is refused, not misread
    cache.put_tensor("s", key, torch.ones(2))
    assert cache.get_image("s", key) is None


def test_bounded_cache_evicts_and_recomputes(store_factory):
    store = store_factory(CacheLimits(max_bytes=3 * (73 * 1280 * 2) + 2000))
    cache = VisionCache(store)
    keys = [cache_key(f"p{i}", "r", "tiny", "m") for i in range(5)]
    for k in keys:
        cache.put_tensor("s", k, torch.zeros(73, 1280, dtype=torch.bfloat16))
    present = [cache.get_tensor("s", k) is not None for k in keys]
    assert present == [False, False, True, True, True]


def test_a_gray_page_is_stored_as_gray_and_read_back_as_it_was():
    import numpy as np

    from optical_memory.cache import image_from_bytes, image_to_bytes, unpack

    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (60, 80), dtype=np.uint8), "L")
    rgb = gray.convert("RGB")
    entry = image_to_bytes("k", rgb)
    assert Image.open(io.BytesIO(unpack("k", entry)[2])).mode == "L"  # one band kept
    assert image_from_bytes("k", entry).mode == "RGB"
    assert image_from_bytes("k", entry).tobytes() == rgb.tobytes()
    assert image_from_bytes("k", entry, gray=True).tobytes() == gray.tobytes()
    colour = rgb.copy()
    colour.putpixel((3, 4), (255, 0, 0))
    assert image_from_bytes("k", image_to_bytes("k", colour), gray=True).mode == "RGB"
    assert image_from_bytes("k", image_to_bytes("k", colour)).tobytes() == colour.tobytes()
