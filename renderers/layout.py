"""Line breaking: a paragraph of one style into lines that fit the text width.

Greedy, by real glyph advances with pair kerning. Breaks go after runs of
whitespace (which hang past the right edge, unseen) and between CJK characters
(not before closing CJK punctuation). A token wider than the line (URL,
base64, hash) is broken hard at the last character that fits. Everything is
vectorised over the paragraph with numpy, and each line costs one binary
search, so a paragraph of n characters takes O(n log n) time and O(n) memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .glyphs import Glyphs, Style

_WHITESPACE = np.array(
    [0x09, 0x20, 0x1680, *range(0x2000, 0x200B), 0x205F, 0x3000], dtype=np.uint32
)
_CJK_RANGES = (
    (0x2E80, 0x303F), (0x3040, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
    (0xFF00, 0xFFEF), (0x20000, 0x3FFFF),
)
_NO_BREAK_BEFORE = np.array(
    [ord(c) for c in "、。〉》」』】〕〗〙〛〞，．：；？！）］｝・ー"], dtype=np.uint32
)


@dataclass(frozen=True)
class Line:
    """One laid-out line: characters [start, end) of the turn, with a glyph per character."""

    start: int
    end: int
    keys: np.ndarray  # [end - start] int64 glyph keys
    x: np.ndarray  # [end - start] int64 pen x in 26.6 from the line's left edge
    missing: int  # characters drawn as the missing-glyph placeholder


def codepoints(text: str) -> np.ndarray:
    """[n] uint32 codepoints of `text` (one per Python character)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def break_paragraph(
    glyphs: Glyphs, style: Style, text: str, offset: int, width: int, newline: bool = False
) -> Iterator[Line]:
    """Lines of `text` (no newline inside) set in `style`, `width` pixels wide.

    `offset` is the position of `text` in its turn; Line.start/end are turn
    offsets. With `newline`, the paragraph's last line also holds the newline
    that ends it. An empty paragraph gives one empty line (a blank line).
    """
    n = len(text)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        yield Line(offset, offset + int(newline), empty, empty, 0)
        return
    cps = codepoints(text)
    keys, advance, right, missing = glyphs.lookup(style, cps)
    kern = glyphs.kerning(keys)
    # pen[i]: pen x of glyph i from the paragraph start; the kerning of a line's
    # first glyph with its predecessor cancels out of pen[i] - pen[line start].
    pen = np.cumsum(advance) - advance + np.cumsum(kern)
    reach = pen + right  # right edge of glyph i's ink or advance
    is_ws = np.isin(cps, _WHITESPACE)
    is_cjk = np.zeros(n, dtype=bool)
    for lo, hi in _CJK_RANGES:
        is_cjk |= (cps >= lo) & (cps <= hi)
    breakable = np.zeros(n + 1, dtype=bool)  # breakable[b]: a line may start at b
    breakable[1:n] = (is_ws[:-1] & ~is_ws[1:]) | (
        (is_cjk[1:] | is_cjk[:-1]) & ~np.isin(cps[1:], _NO_BREAK_BEFORE) & ~is_ws[1:]
    )
    breaks = np.flatnonzero(breakable)
    solid = np.flatnonzero(~is_ws)
    limit = width * 64
    start = 0
    while start < n:
        fit = start + int(np.searchsorted(reach[start:], pen[start] + limit, side="right"))
        if fit >= n:
            end = n
        elif is_ws[fit]:  # everything before the whitespace fits: let the run hang
            j = int(np.searchsorted(solid, fit))
            end = int(solid[j]) if j < len(solid) else n
        else:
            k = int(np.searchsorted(breaks, fit, side="right")) - 1
            end = int(breaks[k]) if k >= 0 and breaks[k] > start else max(fit, start + 1)
        yield Line(
            offset + start,
            offset + end + int(newline and end == n),
            keys[start:end],
            pen[start:end] - pen[start],
            int(missing[start:end].sum()),
        )
        start = end
