"""Text to page images: chat turns laid out with FreeType at the encoder's native geometry."""

from .config import RenderConfig, RenderConfigError
from .fonts import FontFile, FontNotFoundError, FontSet, discover_fonts
from .page import Page, Span
from .raster import encode_png
from .renderer import Renderer, TurnTooLongError

__all__ = [
    "FontFile",
    "FontNotFoundError",
    "FontSet",
    "Page",
    "RenderConfig",
    "RenderConfigError",
    "Renderer",
    "Span",
    "TurnTooLongError",
    "discover_fonts",
    "encode_png",
]
