"""Glyph source: character to glyph through the fallback chain, and glyph bitmaps, cached.

Each face is loaded once per Renderer at the configured pixel size. A glyph is
identified by an integer key (face slot << 20 | glyph index) that is stable for
a given font set, so laid-out pages can be stored and rendered later. A glyph is
rasterised once and kept as the list of its inked pixels relative to the pen
position on the baseline, ready for vectorised composition. Pair kerning
applies between glyphs of the same primary face (text, code, labels); the
fallback faces are set without kerning.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import IntEnum

import freetype
import numpy as np

from .fonts import FontSet
from .kerning import pair_kerning

SLOT_SHIFT = 20
_LOAD_FLAGS = freetype.FT_LOAD_RENDER | freetype.FT_LOAD_TARGET_LIGHT
NOTDEF_KEY = 0  # glyph 0 of the text face: DejaVu's hollow box, the missing-glyph placeholder


class Style(IntEnum):
    """What a run of text is set in; the value is the slot of its primary face."""

    TEXT = 0
    MONO = 1
    LABEL = 2


@dataclass(frozen=True)
class GlyphInk:
    """A rasterised glyph: inked pixels relative to the pen on the baseline (y grows down)."""

    rows: np.ndarray  # [p] int32
    cols: np.ndarray  # [p] int32
    values: np.ndarray  # [p] float32 coverage 1..255
    advance: int  # 26.6 fixed point
    right: int  # 26.6: max(advance, right edge of the ink)


def _display_codepoint(cp: int) -> int:
    """Control characters become visible: C0 and DEL as U+2400 pictures, C1 as U+FFFD."""
    if cp < 0x20:
        return 0x2400 + cp
    if cp == 0x7F:
        return 0x2421
    if 0x80 <= cp < 0xA0:
        return 0xFFFD
    return cp


class Glyphs:
    """The faces of one FontSet at one pixel size, with character and glyph caches."""

    def __init__(self, fonts: FontSet, font_size: int, tab_size: int) -> None:
        self.font_size = font_size
        self.tab_size = tab_size
        # A FreeType face is not thread-safe: loading a glyph overwrites the face's glyph
        # slot, so cache misses (the only FreeType calls after set-up) take this lock.
        self._freetype = threading.Lock()
        self._faces: list[freetype.Face] = []
        self._fonts = [font for _, font in fonts.slots()]
        for font in self._fonts:
            face = freetype.Face(font.path, index=font.index)
            face.set_pixel_sizes(0, font_size)
            self._faces.append(face)
        n_fallbacks = len(fonts.fallbacks)
        fallback_slots = [Style.TEXT, *range(3, 3 + n_fallbacks)]
        self._chains = {
            style: [int(style), *(s for s in fallback_slots if s != style)] for style in Style
        }
        self._chars: dict[tuple[int, int], tuple[int, int, int, bool]] = {}
        self._ink: dict[int, GlyphInk] = {}
        self._kern: dict[tuple[int, int], int] = {}
        text = self._faces[Style.TEXT].size
        self.ascent = (text.ascender + 63) // 64  # pixels above the baseline
        self.x_height = round(0.53 * font_size)

    def lookup(self, style: Style, cps: np.ndarray) -> tuple[np.ndarray, ...]:
        """Glyph keys, advances, right extents (26.6) and missing flags for codepoints [n]."""
        uniq, inverse = np.unique(cps, return_inverse=True)
        info = [self._char(style, int(cp)) for cp in uniq]
        keys = np.array([i[0] for i in info], dtype=np.int64)[inverse]
        advance = np.array([i[1] for i in info], dtype=np.int64)[inverse]
        right = np.array([i[2] for i in info], dtype=np.int64)[inverse]
        missing = np.array([i[3] for i in info], dtype=bool)[inverse]
        return keys, advance, right, missing

    def kerning(self, keys: np.ndarray) -> np.ndarray:
        """26.6 adjustment before each glyph [n] from the pair with its predecessor (0 for the first)."""
        out = np.zeros(len(keys), dtype=np.int64)
        if len(keys) < 2:
            return out
        left, right = keys[:-1], keys[1:]
        slot = left >> SLOT_SHIFT
        same = (slot == (right >> SLOT_SHIFT)) & (slot < len(Style))
        if not same.any():
            return out
        pairs = (left[same] << 32) | right[same]
        uniq, inverse = np.unique(pairs, return_inverse=True)
        values = np.array([self._pair(int(p)) for p in uniq], dtype=np.int64)
        out[1:][same] = values[inverse]
        return out

    def ink(self, key: int) -> GlyphInk:
        glyph = self._ink.get(key)
        if glyph is None:
            with self._freetype:
                glyph = self._ink[key] = self._rasterise(key)
        return glyph

    def _char(self, style: Style, cp: int) -> tuple[int, int, int, bool]:
        cached = self._chars.get((style, cp))
        if cached is not None:
            return cached
        if cp == 0x09:  # tab: a fixed run of spaces
            key, _, _, _ = self._char(style, 0x20)
            advance = self.tab_size * self.ink(key).advance
            result = (key, advance, advance, False)
        else:
            shown = _display_codepoint(cp)
            key, missing = NOTDEF_KEY, True
            with self._freetype:
                for slot in self._chains[style]:
                    index = self._faces[slot].get_char_index(shown)
                    if index:
                        key, missing = (slot << SLOT_SHIFT) | index, False
                        break
            glyph = self.ink(key)
            result = (key, glyph.advance, glyph.right, missing)
        self._chars[(style, cp)] = result
        return result

    def _pair(self, pair: int) -> int:
        value = self._kern.get(pair)
        if value is None:
            left, right = pair >> 32, pair & 0xFFFFFFFF
            slot = left >> SLOT_SHIFT
            mask = (1 << SLOT_SHIFT) - 1
            font = self._fonts[slot]
            kern = pair_kerning(font.path, font.index)
            units = kern(left & mask, right & mask)
            value = self._kern[pair] = round(units * self.font_size * 64 / kern.units_per_em)
        return value

    def _rasterise(self, key: int) -> GlyphInk:
        face = self._faces[key >> SLOT_SHIFT]
        face.load_glyph(key & ((1 << SLOT_SHIFT) - 1), _LOAD_FLAGS)
        slot = face.glyph
        bitmap = slot.bitmap
        advance = slot.advance.x
        if bitmap.width == 0 or bitmap.rows == 0:
            empty = np.zeros(0, dtype=np.int32)
            return GlyphInk(empty, empty, empty.astype(np.float32), advance, advance)
        buf = np.array(bitmap.buffer, dtype=np.uint8).reshape(bitmap.rows, bitmap.pitch)
        buf = buf[:, : bitmap.width]
        rows, cols = np.nonzero(buf)
        values = buf[rows, cols].astype(np.float32)
        right = max(advance, (slot.bitmap_left + bitmap.width) * 64)
        return GlyphInk(
            (rows - slot.bitmap_top).astype(np.int32),
            (cols + slot.bitmap_left).astype(np.int32),
            values,
            advance,
            right,
        )
