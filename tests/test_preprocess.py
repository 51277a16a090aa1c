import pytest
import torch
from PIL import Image

from optical_memory.backends.deepseek_ocr.preprocess import MAX_IMAGE_PIXELS, make_views, normalize


def test_base_pads_to_square_with_grey_keeping_aspect():
    # 200x100 white -> 1024x512 white band centred in a 1024x1024 grey square
    views = make_views(Image.new("RGB", (200, 100), (255, 255, 255)), "base")
    g = views.global_view
    assert g.shape == (3, 1024, 1024) and g.dtype == torch.uint8
    assert (g[:, :256] == 127).all() and (g[:, 768:] == 127).all()
    assert (g[:, 256:768] == 255).all()
    assert views.tiles.shape[0] == 0 and views.tile_grid == (1, 1)


@pytest.mark.parametrize(("mode", "side"), [("tiny", 512), ("small", 640)])
def test_tiny_and_small_squash_without_padding(mode, side):
    views = make_views(Image.new("RGB", (300, 100), (10, 20, 30)), mode)
    assert views.global_view.shape == (3, side, side)
    assert views.global_view[:, 0, 0].tolist() == [10, 20, 30]
    assert views.global_view[:, side - 1, side - 1].tolist() == [10, 20, 30]


def test_normalisation_is_mean_half_std_half():
    pixels = torch.tensor([0, 127, 255], dtype=torch.uint8)
    assert normalize(pixels, torch.float32).tolist() == pytest.approx(
        [-1.0, (127 / 255 - 0.5) / 0.5, 1.0]
    )


def test_gundam_tiles_are_cut_row_by_row():
    # 1280x640 -> tile grid (2, 1); left half red, right half blue
    image = Image.new("RGB", (1280, 640), (255, 0, 0))
    image.paste((0, 0, 255), (640, 0, 1280, 640))
    views = make_views(image, "gundam")
    assert views.tile_grid == (2, 1)
    assert views.tiles.shape == (2, 3, 640, 640)
    assert views.tiles[0, :, 320, 100].tolist() == [255, 0, 0]
    assert views.tiles[1, :, 320, 540].tolist() == [0, 0, 255]
    # the global view is the whole page padded to 1024: grey bars top and bottom
    assert views.global_view.shape == (3, 1024, 1024)
    assert views.global_view[:, 10, 500].tolist() == [127, 127, 127]


def test_gundam_small_image_has_global_view_only():
    views = make_views(Image.new("RGB", (640, 600)), "gundam")
    assert views.tiles.shape == (0, 3, 640, 640) and views.tile_grid == (1, 1)


def test_non_rgb_is_converted():
    views = make_views(Image.new("L", (64, 64), 200), "tiny")
    assert views.global_view.shape == (3, 512, 512)
    assert (views.global_view == 200).all()


def test_bad_images_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        make_views(Image.new("RGB", (0, 10)), "base")
    too_big = Image.new("L", (MAX_IMAGE_PIXELS // 1000 + 1, 1000))
    with pytest.raises(ValueError, match="over the limit"):
        make_views(too_big, "base")
    with pytest.raises(ValueError, match="valid modes: tiny, small, base, large, gundam"):
        make_views(Image.new("RGB", (10, 10)), "huge")


@pytest.mark.parametrize("mode", ["tiny", "small", "base", "large", "gundam"])
@pytest.mark.parametrize("size", [(1280, 1280), (1280, 700), (500, 1500)])
def test_a_gray_image_gives_the_views_of_its_rgb_conversion(mode, size):
    import numpy as np

    rng = np.random.default_rng(sum(size))
    gray = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L")
    got, want = make_views(gray, mode), make_views(gray.convert("RGB"), mode)
    assert got.tile_grid == want.tile_grid
    assert torch.equal(got.global_view, want.global_view)
    assert torch.equal(got.tiles, want.tiles)
