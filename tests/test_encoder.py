import pytest
import torch
from PIL import Image, ImageDraw

from optical_memory.backends.deepseek_ocr import load_encoder
from optical_memory.backends.deepseek_ocr.testing import TINY_HIDDEN, write_tiny_encoder
from optical_memory.modes import get_mode


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    write_tiny_encoder(directory)
    return load_encoder(directory)


def page(width: int, height: int, seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i in range(0, height, 24):
        draw.text((8 + seed, i), f"line {i} of page {seed}", fill="black")
    return image


def newline_rows(tokens: torch.Tensor, newline: torch.Tensor) -> list[int]:
    return torch.nonzero((tokens == newline).all(dim=1)).flatten().tolist()


def test_defaults_on_cpu(encoder):
    assert encoder.device.type == "cpu" and encoder.dtype == torch.float32
    assert encoder.hidden_size == TINY_HIDDEN
    assert len(encoder.fingerprint) == 64


@pytest.mark.parametrize("mode", ["tiny", "small", "base"])
def test_token_count_and_layout_of_global_modes(encoder, mode):
    tokens = encoder.encode(page(300, 500), mode)
    n = get_mode(mode).grid
    assert tokens.shape == (get_mode(mode).vision_tokens(), TINY_HIDDEN)
    # each of the n grid rows ends with image_newline; the last token is view_seperator
    assert newline_rows(tokens, encoder.model.image_newline) == [r * (n + 1) + n for r in range(n)]
    assert torch.equal(tokens[-1], encoder.model.view_seperator)


def test_gundam_layout_local_grid_then_global_then_separator(encoder):
    image = page(1300, 700)  # tile grid (2, 1): local grid 10 rows of 20 + newline
    assert get_mode("gundam").tile_grid(*image.size) == (2, 1)
    tokens = encoder.encode(image, "gundam")
    assert tokens.shape[0] == get_mode("gundam").vision_tokens(1300, 700) == 273 + 21 * 10
    local = [r * 21 + 20 for r in range(10)]
    global_ = [210 + r * 17 + 16 for r in range(16)]
    assert newline_rows(tokens, encoder.model.image_newline) == local + global_
    assert torch.equal(tokens[-1], encoder.model.view_seperator)


def test_layout_stitches_tiles_row_by_row(encoder):
    # 3 tiles across, 2 down, each 2x2 features; value = tile index * 10 + position in tile
    c = TINY_HIDDEN
    tiles = torch.arange(6).repeat_interleave(4).float() * 10 + torch.arange(4).repeat(6)
    tiles = tiles.view(6, 4, 1).expand(6, 4, c)
    global_ = torch.full((4, c), -1.0)
    out = encoder.model.layout(global_, tiles, (3, 2))
    first_column = out[:, 0].tolist()
    nl = encoder.model.image_newline[0].item()
    # row 0 of the stitched grid: tile 0 row 0, tile 1 row 0, tile 2 row 0, newline
    assert first_column[:7] == [0, 1, 10, 11, 20, 21, nl]
    assert first_column[7:14] == [2, 3, 12, 13, 22, 23, nl]
    assert first_column[14:21] == [30, 31, 40, 41, 50, 51, nl]
    assert first_column[28:34] == [-1, -1, nl, -1, -1, nl]
    assert out.shape[0] == 4 * 7 + 2 * 3 + 1


def test_encode_is_deterministic_and_batch_matches_single(encoder):
    images = [page(700, 900, seed=s) for s in range(3)]
    batch = encoder.encode_batch(images, "small")
    for image, tokens in zip(images, batch):
        single = encoder.encode(image, "small")
        torch.testing.assert_close(tokens, single, rtol=1e-5, atol=1e-5)
    assert torch.equal(encoder.encode(images[0], "small"), encoder.encode(images[0], "small"))
    assert not torch.allclose(batch[0], batch[1])


def test_gundam_batch_mixes_tiled_and_untiled_pages(encoder):
    images = [page(1300, 700), page(500, 400), page(700, 1400)]
    out = encoder.encode_batch(images, "gundam")
    gundam = get_mode("gundam")
    assert [t.shape[0] for t in out] == [gundam.vision_tokens(*im.size) for im in images]
    torch.testing.assert_close(out[2], encoder.encode(images[2], "gundam"), rtol=1e-5, atol=1e-5)


def test_unknown_mode_names_valid_ones(encoder):
    with pytest.raises(ValueError, match="valid modes"):
        encoder.encode(page(100, 100), "ultra")


def test_fast_sam_modules_equal_transformers_sam(tmp_path):
    write_tiny_encoder(tmp_path, seed=5)
    fast = load_encoder(tmp_path, sam_implementation="fast")
    reference = load_encoder(tmp_path, sam_implementation="transformers")
    image = page(900, 700)
    torch.testing.assert_close(
        fast.encode(image, "base"), reference.encode(image, "base"), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="valid: fast, transformers"):
        load_encoder(tmp_path, sam_implementation="flash")


def test_cuda_graph_batches_pad_to_few_sizes_with_under_half_padding():
    from optical_memory.backends.deepseek_ocr.runtime import graph_batch

    sizes = [graph_batch(n) for n in range(1, 65)]
    assert sorted(set(sizes)) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert all(n <= b < 2 * n for n, b in zip(range(1, 65), sizes))
