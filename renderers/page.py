"""Pages: immutable groups of consecutive turns (or parts of turns), laid out and ready to draw."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of turn `turn` (an index into the paginated messages)."""

    turn: int
    start: int
    end: int


@dataclass(frozen=True)
class Rule:
    """A horizontal rule in pixels: the turn separator after a role label."""

    y: int
    x0: int
    x1: int


@dataclass(frozen=True)
class PlacedImage:
    """A message's image drawn on a page: its box in pixels and the image (an
    `optical_memory.messages.ImageData`), scaled to the box when the page is rendered."""

    x: int
    y: int
    width: int
    height: int
    image: Any = field(repr=False)


@dataclass(frozen=True)
class Page:
    """One page. `full` is False only for a trailing page that still had room.

    `content_hash` is the sha256 of the render inputs (roles, span texts, whether
    each span continues a turn, labels, the bytes of images, and the render config
    fingerprint), so equal hashes mean equal images. `next_start` is where
    pagination continues.
    """

    mode: str
    width: int
    height: int
    spans: tuple[Span, ...]
    text_tokens: int
    vision_tokens: int
    full: bool
    content_hash: str
    missing_glyphs: int
    next_start: tuple[int, int]
    fingerprint: str
    # Laid-out glyphs and rules, in pixels; drawn by Renderer.render.
    glyph_x: np.ndarray = field(repr=False, compare=False)  # [g] int32 pen x
    glyph_y: np.ndarray = field(repr=False, compare=False)  # [g] int32 baseline y
    glyph_keys: np.ndarray = field(repr=False, compare=False)  # [g] int64 glyph keys
    rules: tuple[Rule, ...] = field(repr=False, compare=False, default=())
    images: tuple[PlacedImage, ...] = field(repr=False, compare=False, default=())

    @property
    def first_turn(self) -> int:
        return self.spans[0].turn

    @property
    def last_turn(self) -> int:
        return self.spans[-1].turn
