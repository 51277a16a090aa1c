"""How well a page reads back at a compression ratio: the published DeepSeek-OCR Fox figures.

Source: DeepSeek-OCR: Contexts Optical Compression (Wei, Sun, Li; DeepSeek-AI,
arXiv 2510.18234), Table 2, the Fox benchmark's English pages grouped by their
ground-truth text tokens, decoded from 64 and 100 vision tokens. The compression
ratio there is text tokens / vision tokens, with vision tokens counted as the
encoder's output grid (no newline or view-separator positions):

    text tokens   vision tokens   ratio   precision
    600-700       100              6.7x    98.5%
    700-800       100              7.5x    97.3%
    600-700        64             10.5x    96.5%
    1200-1300     100             12.6x    87.1%
    1200-1300      64             19.7x    59.1%

Between the figures precision is interpolated linearly in the ratio; at or below
6.7x it is the best published figure, 0.985 (nothing sharper was measured); past
19.7x the last segment's slope is continued down to 0 (no published figure).
Text reads at 1.0 and a page out of the context at 0.0.

    >>> expected_precision(6.7)
    0.985
    >>> round(expected_precision(16.15), 3)
    0.731
"""

from __future__ import annotations

import bisect
import math

SOURCE = "DeepSeek-OCR: Contexts Optical Compression (arXiv 2510.18234), Table 2 (Fox benchmark)"

# (compression ratio, precision), ascending in ratio and descending in precision
FOX_FIGURES: tuple[tuple[float, float], ...] = (
    (6.7, 0.985),
    (7.5, 0.973),
    (10.5, 0.965),
    (12.6, 0.871),
    (19.7, 0.591),
)
TEXT_PRECISION = 1.0
OUT_PRECISION = 0.0

_RATIOS = [r for r, _ in FOX_FIGURES]


def expected_precision(ratio: float) -> float:
    """Expected reading precision of a page compressed `ratio` times (text / vision tokens)."""
    if math.isnan(ratio) or ratio < 0:
        raise ValueError(f"compression ratio must be a non-negative number, got {ratio}")
    if ratio <= _RATIOS[0]:
        return FOX_FIGURES[0][1]
    i = bisect.bisect_left(_RATIOS, ratio)
    if i == len(_RATIOS):
        (r0, p0), (r1, p1) = FOX_FIGURES[-2], FOX_FIGURES[-1]
    else:
        (r0, p0), (r1, p1) = FOX_FIGURES[i - 1], FOX_FIGURES[i]
    return max(OUT_PRECISION, p0 + (p1 - p0) * (ratio - r0) / (r1 - r0))


def page_precision(text_tokens: int, vision_tokens: int) -> float:
    """Expected precision of a page of `text_tokens` sent as `vision_tokens` (paper's count)."""
    if vision_tokens <= 0:
        return OUT_PRECISION
    return expected_precision(text_tokens / vision_tokens)
