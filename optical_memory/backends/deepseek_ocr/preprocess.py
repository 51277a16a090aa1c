"""Page image -> encoder views for a resolution mode, as the DeepSeek-OCR reference prepares them.

Tiny and Small resize the image to the square view (`squash`); Base, Large and
the Gundam global view pad it to the square with colour (127, 127, 127),
keeping the aspect ratio (`PIL.ImageOps.pad`, centred, bicubic); Gundam's local
tiles come from resizing the image to the tile grid and cropping 640x640 tiles
row by row. Views stay uint8 here; `normalize` maps them to mean 0.5, std 0.5
wherever the encoder runs, so only bytes cross to the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from optical_memory.modes import PAD_COLOR, Mode, get_mode

# Larger page images are refused rather than resized: 40 megapixels is over
# 6000x6000, far beyond any page the renderers produce.
MAX_IMAGE_PIXELS = 40_000_000
RESAMPLE = Image.Resampling.BICUBIC  # the default of Image.resize and ImageOps.pad


@dataclass(frozen=True)
class Views:
    """One image's views: `global_view` [3, S, S] and `tiles` [n, 3, T, T] uint8 (n may be 0)."""

    global_view: torch.Tensor
    tiles: torch.Tensor
    tile_grid: tuple[int, int]  # (across, down); (1, 1) when there are no tiles


def check_image(image: Image.Image) -> Image.Image:
    """The image as RGB, or as it is when gray ("L"); a zero-sized or over-large image
    raises ValueError."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValueError(f"image is empty ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"image of {width}x{height} = {width * height} pixels is over the limit of "
            f"{MAX_IMAGE_PIXELS} pixels (optical_memory.backends.deepseek_ocr.preprocess.MAX_IMAGE_PIXELS)"
        )
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB or gray PIL image -> contiguous uint8 tensor [3, H, W] (batches stack it with one
    copy; a gray image's value in each channel, as its RGB conversion)."""
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        return torch.from_numpy(np.broadcast_to(pixels, (3, *pixels.shape)).copy())
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def normalize(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> `dtype`, scaled to [0, 1] then normalised with mean 0.5, std 0.5."""
    return pixels.float().div_(255.0).sub_(0.5).div_(0.5).to(dtype)


def global_view(image: Image.Image, mode: Mode) -> Image.Image:
    size = (mode.base_size, mode.base_size)
    if mode.squash:
        return image.resize(size, resample=RESAMPLE)
    color = PAD_COLOR[0] if image.mode == "L" else PAD_COLOR  # a gray: the same either way
    return ImageOps.pad(image, size, method=RESAMPLE, color=color)


def local_tiles(image: Image.Image, mode: Mode, grid: tuple[int, int]) -> list[Image.Image]:
    """The image resized to the tile grid and cut into tiles, row by row."""
    across, down = grid
    t = mode.tile_size
    resized = image.resize((across * t, down * t), resample=RESAMPLE)
    return [
        resized.crop((col * t, row * t, (col + 1) * t, (row + 1) * t))
        for row in range(down)
        for col in range(across)
    ]


def make_views(image: Image.Image, mode: str | Mode) -> Views:
    """The uint8 views of `image` for `mode` (checked and converted to RGB first). A gray
    ("L") image is resized as it is: PIL resizes each channel with the same arithmetic, so
    its views equal those of its RGB conversion, for a third of the work."""
    mode = get_mode(mode)
    image = check_image(image)
    grid = mode.tile_grid(*image.size)
    tiles = local_tiles(image, mode, grid) if grid != (1, 1) else []
    t = mode.tile_size
    return Views(
        global_view=to_tensor(global_view(image, mode)),
        tiles=(
            torch.stack([to_tensor(tile) for tile in tiles])
            if tiles
            else torch.empty(0, 3, t, t, dtype=torch.uint8)
        ),
        tile_grid=grid,
    )
