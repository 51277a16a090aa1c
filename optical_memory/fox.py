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

import numpy as np

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

# The figures, then where the last segment, continued, reaches 0: the points to interpolate.
(_R0, _P0), (_R1, _P1) = FOX_FIGURES[-2], FOX_FIGURES[-1]
_RATIOS = np.array([*(r for r, _ in FOX_FIGURES), _R1 + _P1 * (_R1 - _R0) / (_P0 - _P1)])
_PRECISIONS = np.array([*(p for _, p in FOX_FIGURES), OUT_PRECISION])


def expected_precision(ratio: float | np.ndarray) -> float | np.ndarray:
    """Expected reading precision of a page compressed `ratio` times (text / vision tokens);
    `ratio` may be an array (the precisions come back as one)."""
    ratios = np.asarray(ratio, dtype=np.float64)
    if np.isnan(ratios).any() or (ratios < 0).any():
        raise ValueError(f"compression ratio must be a non-negative number, got {ratio}")
    out = np.interp(ratios, _RATIOS, _PRECISIONS, left=_PRECISIONS[0], right=OUT_PRECISION)
    return float(out) if out.ndim == 0 else out


def page_precision(
    text_tokens: float | np.ndarray, vision_tokens: float | np.ndarray
) -> float | np.ndarray:
    """Expected precision of pages of `text_tokens` sent as `vision_tokens` (the paper's
    count; 0 or fewer: out of the context); arrays broadcast."""
    text = np.asarray(text_tokens, dtype=np.float64)
    vision = np.asarray(vision_tokens, dtype=np.float64)
    sent = vision > 0
    ratio = np.divide(text, vision, out=np.zeros(np.broadcast(text, vision).shape), where=sent)
    out = np.where(sent, expected_precision(ratio), OUT_PRECISION)
    return float(out) if out.ndim == 0 else out
