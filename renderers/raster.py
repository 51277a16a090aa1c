"""Composition: laid-out glyphs into a grayscale ink canvas, vectorised, and PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .glyphs import Glyphs
from .page import Rule

RULE_INK = 110  # turn separators are drawn in mid grey


def compose(
    glyphs: Glyphs,
    x: np.ndarray,
    y: np.ndarray,
    keys: np.ndarray,
    rules: tuple[Rule, ...],
    width: int,
    height: int,
    rule_thickness: int,
) -> np.ndarray:
    """[height, width] uint8 ink (0 = paper) for glyphs at pen positions (x, y) [g].

    Each distinct glyph is placed at all its positions with one broadcast; the
    coverage of overlapping glyphs adds up (clipped at 255) through one bincount.
    Ink outside the canvas is dropped.
    """
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    uniq, first = np.unique(sorted_keys, return_index=True)
    bounds = [*first.tolist(), len(keys)]
    flat_parts, value_parts = [], []
    for i, key in enumerate(uniq.tolist()):
        ink = glyphs.ink(key)
        if len(ink.values) == 0:
            continue
        at = order[bounds[i] : bounds[i + 1]]
        rows = (y[at, None] + ink.rows[None, :]).ravel()  # [m * p]
        cols = (x[at, None] + ink.cols[None, :]).ravel()
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        flat_parts.append((rows * width + cols)[inside])
        value_parts.append(np.broadcast_to(ink.values, (len(at), len(ink.values))).ravel()[inside])
    canvas = np.zeros(width * height, dtype=np.float32)
    if flat_parts:
        flat = np.concatenate(flat_parts)
        canvas += np.bincount(flat, weights=np.concatenate(value_parts), minlength=width * height)
    canvas = canvas.reshape(height, width)
    for rule in rules:
        band = canvas[rule.y : rule.y + rule_thickness, rule.x0 : rule.x1]
        np.maximum(band, RULE_INK, out=band)
    return np.minimum(canvas, 255).astype(np.uint8)


def ink_to_image(ink: np.ndarray) -> Image.Image:
    """Black ink on white paper as an RGB image."""
    return Image.fromarray(255 - ink).convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with fixed settings and no metadata, so equal images give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()
