import pytest

from optical_memory.modes import MODES, get_mode, tile_grid


@pytest.mark.parametrize(
    ("name", "tokens"), [("tiny", 73), ("small", 111), ("base", 273), ("large", 421)]
)
def test_token_counts_of_untiled_modes(name, tokens):
    assert MODES[name].vision_tokens() == tokens


def test_gundam_counts_global_view_plus_stitched_tiles():
    gundam = get_mode("gundam")
    # 1280x1280 tiles 2x2: 273 global + (10*2 + 1) * (10*2) local
    assert gundam.tile_grid(1280, 1280) == (2, 2)
    assert gundam.vision_tokens(1280, 1280) == 273 + 21 * 20
    # no larger than one tile: global view only
    assert gundam.vision_tokens(640, 480) == 273
    with pytest.raises(ValueError, match="width and height"):
        gundam.vision_tokens()


@pytest.mark.parametrize(
    ("size", "grid"),
    [((1920, 640), (3, 1)), ((640, 1920), (1, 3)), ((1280, 1920), (2, 3)), ((4000, 500), (8, 1))],
)
def test_tile_grid_follows_aspect_ratio(size, grid):
    assert tile_grid(*size) == grid


def test_square_tie_goes_to_larger_grid_only_for_large_images():
    # (2,2) and (3,3) tie on aspect ratio; (3,3) wins once the image has over half its pixels
    assert tile_grid(1300, 1300) == (2, 2)
    assert tile_grid(1400, 1400) == (3, 3)


def test_unknown_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match="tiny, small, base, large, gundam"):
        get_mode("huge")
