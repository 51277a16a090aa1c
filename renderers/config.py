"""Render configuration: page geometry, type size, spacing and faces, per mode."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

from optical_memory.modes import get_mode

from .fonts import FontSet, discover_fonts

LAYOUT_VERSION = 1  # bump when layout or rasterisation changes what a page looks like
GUNDAM_TILE = 640

# Defaults chosen with benchmarks/legibility.py (README, "Legibility"): the smallest
# measured font size per mode whose Tesseract character error rate is <= 5%; at 1280
# the lowest CER measured there, 18 px. Memory pages use memory_page() instead.
_MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"size": 512, "font_size": 12, "margin": 10},
    "small": {"size": 640, "font_size": 11, "margin": 12},
    "base": {"size": 1024, "font_size": 12, "margin": 18},
    "large": {"size": 1280, "font_size": 18, "margin": 22},
    "gundam": {"size": 1280, "font_size": 18, "margin": 22},
}


class RenderConfigError(ValueError):
    """A render configuration that cannot produce a page at the encoder's geometry."""


@dataclass(frozen=True)
class RenderConfig:
    """Everything that decides how a page looks.

    Sizes are in pixels. Tiny, Small, Base and Large pages are squares of the
    mode's native side (512, 640, 1024, 1280), so no vision token goes to
    padding; Gundam canvases are multiples of its 640 tile in each direction.
    `fonts` None means the installed default faces (see renderers.fonts).
    A turn longer than `max_turn_chars` is refused with a clear error.
    """

    mode: str = "base"
    width: int = 1024
    height: int = 1024
    font_size: int = 12
    line_spacing: float = 1.25
    margin: int = 18
    tab_size: int = 4
    max_turn_chars: int = 8_000_000
    fonts: FontSet | None = None

    def __post_init__(self) -> None:
        mode = get_mode(self.mode)
        if mode.tiled:
            if self.width % GUNDAM_TILE or self.height % GUNDAM_TILE or self.width <= 0 or self.height <= 0:
                raise RenderConfigError(
                    f"gundam canvas must be a positive multiple of {GUNDAM_TILE} in each direction, "
                    f"got {self.width}x{self.height}"
                )
        elif (self.width, self.height) != (mode.base_size, mode.base_size):
            raise RenderConfigError(
                f"{mode.name} pages are {mode.base_size}x{mode.base_size}, got {self.width}x{self.height}"
            )
        if self.font_size < 4:
            raise RenderConfigError(f"font_size must be at least 4 px, got {self.font_size}")
        if self.line_spacing < 1.0:
            raise RenderConfigError(f"line_spacing must be at least 1.0, got {self.line_spacing}")
        if not 0 <= self.margin < min(self.width, self.height) // 4:
            raise RenderConfigError(f"margin {self.margin} px does not leave room for text")
        if self.lines_per_page < 2:
            raise RenderConfigError("font_size and margin leave fewer than two lines per page")
        if self.tab_size < 1 or self.max_turn_chars < 1:
            raise RenderConfigError("tab_size and max_turn_chars must be positive")

    @classmethod
    def for_mode(cls, mode: str, **overrides: Any) -> RenderConfig:
        """The documented defaults for `mode`, with any field overridden."""
        name = get_mode(mode).name
        d = _MODE_DEFAULTS[name]
        fields = {
            "mode": name,
            "width": d["size"],
            "height": d["size"],
            "font_size": d["font_size"],
            "margin": d["margin"],
        }
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def memory_page(cls, **overrides: Any) -> RenderConfig:
        """The memory's page: the 1280x1280 Gundam canvas at 14 px, any field overridden.

        The memory renders a page once at 1280 and derives the other modes from it.
        benchmarks/forgetting_curve.py (README, "Forgetting curve") measured 12-18 px:
        14 px is the densest size whose native-resolution views (Large, Gundam's tiles)
        keep a Tesseract CER of about 5%, and its chat pages (about 770 text tokens)
        outweigh Gundam's 693 and Large's 421 vision tokens; at 18 px (about 580) they
        did not, so the policy never chose Gundam. Base, Small and Tiny see the page
        scaled to 11.2, 7 and 5.6 px, and fade.
        """
        return cls.for_mode("gundam", **{"font_size": 14, **overrides})

    @property
    def line_height(self) -> int:
        return max(self.font_size, round(self.font_size * self.line_spacing))

    @property
    def lines_per_page(self) -> int:
        return (self.height - 2 * self.margin) // self.line_height

    @property
    def text_width(self) -> int:
        return self.width - 2 * self.margin

    @property
    def vision_tokens(self) -> int:
        """Vision tokens one page of this configuration costs at its mode."""
        return get_mode(self.mode).vision_tokens(self.width, self.height)

    def resolved_fonts(self) -> FontSet:
        return self.fonts if self.fonts is not None else discover_fonts()

    def fingerprint(self) -> str:
        """sha256 over every render input: the fields, the layout version and the font files' hashes."""
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        fields = asdict(self)
        fields["fonts"] = self.resolved_fonts().describe()
        fields["layout_version"] = LAYOUT_VERSION
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()
