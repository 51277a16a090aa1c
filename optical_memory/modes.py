"""The five DeepEncoder resolution modes, as data.

A mode says how a page image becomes encoder views and how many vision tokens
that costs. The numbers and the tiling rule follow the DeepSeek-OCR reference
preprocessing: Tiny and Small squash the image to a square, Base and Large pad
it to a square keeping the aspect ratio, Gundam adds 640x640 local tiles to a
padded 1024 global view. Nothing here needs torch, so token budgets can be
planned without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PATCH_SIZE = 16  # SAM patch size in pixels
DOWNSAMPLE = 4  # the two stride-2 convolutions after the SAM neck
PAD_COLOR = (127, 127, 127)  # int(0.5 * 255) per channel: the normalisation mean
MIN_TILES = 2
MAX_TILES = 9


@dataclass(frozen=True)
class Mode:
    """One resolution mode.

    `base_size` is the side of the global view. `tile_size` is the side of a
    local tile (Gundam only; equal to `base_size` elsewhere). `squash` modes
    resize the image to the square directly; the others pad it.
    """

    name: str
    base_size: int
    tile_size: int
    tiled: bool
    squash: bool

    @property
    def grid(self) -> int:
        """Side of the global view's feature grid (8 for Tiny ... 20 for Large)."""
        return grid_side(self.base_size)

    def tile_grid(self, width: int, height: int) -> tuple[int, int]:
        """(tiles across, tiles down) for an image of this size; (1, 1) means no local tiles."""
        if not self.tiled:
            return (1, 1)
        return tile_grid(width, height, tile_size=self.tile_size)

    def grid_tokens(self, width: int | None = None, height: int | None = None) -> int:
        """Vision tokens as the DeepSeek-OCR paper counts them: the feature grids of the global
        view and of any local tiles, without newline and separator positions."""
        n = self.grid
        tokens = n * n
        if self.tiled:
            if width is None or height is None:
                raise ValueError("gundam token count needs the image width and height")
            tiles_w, tiles_h = self.tile_grid(width, height)
            if tiles_w > 1 or tiles_h > 1:
                tokens += tiles_w * tiles_h * grid_side(self.tile_size) ** 2
        return tokens

    def vision_tokens(self, width: int | None = None, height: int | None = None) -> int:
        """Vision tokens for one image, newlines and the view separator included.

        Gundam needs the image size (its tile grid depends on the aspect ratio);
        the other modes do not.
        """
        n = self.grid
        tokens = n * (n + 1) + 1  # global rows each followed by a newline, then the separator
        if self.tiled:
            if width is None or height is None:
                raise ValueError("gundam token count needs the image width and height")
            tiles_w, tiles_h = self.tile_grid(width, height)
            if tiles_w > 1 or tiles_h > 1:
                q = grid_side(self.tile_size)
                tokens += (q * tiles_w + 1) * (q * tiles_h)
        return tokens


def grid_side(size: int) -> int:
    """Feature grid side for a square view of `size` pixels: ceil(size / 16 / 4)."""
    return math.ceil((size // PATCH_SIZE) / DOWNSAMPLE)


MODES: dict[str, Mode] = {
    "tiny": Mode("tiny", base_size=512, tile_size=512, tiled=False, squash=True),
    "small": Mode("small", base_size=640, tile_size=640, tiled=False, squash=True),
    "base": Mode("base", base_size=1024, tile_size=1024, tiled=False, squash=False),
    "large": Mode("large", base_size=1280, tile_size=1280, tiled=False, squash=False),
    "gundam": Mode("gundam", base_size=1024, tile_size=640, tiled=True, squash=False),
}

# From the sharpest memory to the faintest: the order in which pages fade.
FADING_ORDER: tuple[str, ...] = ("gundam", "large", "base", "small", "tiny")


def get_mode(name: str | Mode) -> Mode:
    """The mode called `name`; an unknown name raises ValueError listing the valid ones."""
    if isinstance(name, Mode):
        return name
    try:
        return MODES[name]
    except (KeyError, TypeError):
        valid = ", ".join(MODES)
        raise ValueError(f"unknown mode {name!r}; valid modes: {valid}") from None


def tile_grid(
    width: int,
    height: int,
    *,
    tile_size: int = 640,
    min_tiles: int = MIN_TILES,
    max_tiles: int = MAX_TILES,
) -> tuple[int, int]:
    """The reference's dynamic tiling: the (across, down) grid whose aspect ratio is closest.

    An image no larger than one tile gets no local tiles: (1, 1). Candidate grids
    are ordered by tile count and ties in aspect ratio go to the larger grid only
    when the image has more than half that grid's pixels, as in the reference.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if width <= tile_size and height <= tile_size:
        return (1, 1)
    aspect = width / height
    candidates = sorted(
        {
            (i, j)
            for n in range(min_tiles, max_tiles + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_tiles <= i * j <= max_tiles
        },
        key=lambda ij: ij[0] * ij[1],
    )
    best, best_diff = (1, 1), float("inf")
    for i, j in candidates:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * i * j:
            best = (i, j)
    return best
