"""How vision models count page images: the tier tables the planner spends a window with.

A profile is data: the model's window, the geometry a page is sent at for each
tier (gundam, large, base, small, tiny), the OpenAI `detail` per tier where the
model has one, and the formula that turns a page's geometry into positions, as
that model's own preprocessing counts them. The forgetting schedule then means
something for the model that reads the pages: a tiny page costs what it costs
there.

    >>> get_profile("qwen2.5-vl").tiers((1280, 1280))["base"].cost
    843
    >>> get_profile("gpt-4o").tiers((1280, 1280))["tiny"].cost
    85
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial

from optical_memory.modes import FADING_ORDER, MODES

Geometry = tuple[int, int] | None  # (width, height); None: the page as rendered (the canvas)


@dataclass(frozen=True)
class Tier:
    """One page at one tier: the image size sent and its cost in the model's positions."""

    name: str
    width: int
    height: int
    cost: int
    detail: str | None = None  # OpenAI image `detail` ("low" / "high"), where the model has one
    # vision tokens as compression ratios count them (the encoder's grid, without newline,
    # separator or start/end positions); the expected precision of a page is read from them
    tokens: int = 0


@dataclass(frozen=True)
class Profile:
    """A model's window and tier table. `cost(tier, width, height, detail)` -> positions."""

    name: str
    window: int
    geometry: Mapping[str, Geometry]
    cost: Callable[[str, int, int, str | None], int]
    detail: Mapping[str, str] = field(default_factory=dict)
    label_tokens: int = 0  # positions reserved per page for its text label ("turns 3-9, ...")
    source: str = ""
    # vision tokens without the positions that carry no image content (see Tier.tokens);
    # None: the cost
    tokens: Callable[[str, int, int, str | None], int] | None = None

    def tiers(self, canvas: tuple[int, int]) -> dict[str, Tier]:
        """Each tier's Tier for pages rendered on `canvas`: fitted within the tier's geometry."""
        out = {}
        for name in FADING_ORDER:
            width, height = fit_within(canvas, self.geometry[name])
            detail = self.detail.get(name)
            cost = self.cost(name, width, height, detail)
            tokens = self.tokens(name, width, height, detail) if self.tokens else cost
            out[name] = Tier(name, width, height, cost, detail, tokens)
        return out

    def with_window(self, window: int) -> Profile:
        if window <= 0:
            raise ValueError(f"profile {self.name!r}: window must be positive, got {window}")
        return replace(self, window=window)


def fit_within(canvas: tuple[int, int], box: Geometry) -> tuple[int, int]:
    """The canvas scaled (down or up) to fit `box` keeping its aspect ratio; None keeps it."""
    width, height = canvas
    if box is None:
        return width, height
    scale = min(box[0] / width, box[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# --- DeepSeek-OCR -----------------------------------------------------------------
# Token counts of DeepEncoder's modes (DeepSeek-OCR, deepseek_ocr.py / image_process.py:
# q = ceil(size / 16 / 4) per side, a newline after each grid row, one view separator;
# Gundam adds 640x640 local tiles of its dynamic tiling); see optical_memory.modes.
def deepseek_ocr_cost(tier: str, width: int, height: int, detail: str | None = None) -> int:
    """The local model encodes each tier at its own mode."""
    return MODES[tier].vision_tokens(width, height)


def deepseek_ocr_tokens(tier: str, width: int, height: int, detail: str | None = None) -> int:
    """The encoder's grid at each tier, as the DeepSeek-OCR paper counts vision tokens."""
    return MODES[tier].grid_tokens(width, height)


def fixed_mode_tokens(mode: str, tier: str, width: int, height: int, detail: str | None = None) -> int:
    return MODES[mode].grid_tokens(width, height)


def fixed_mode_cost(mode: str, tier: str, width: int, height: int, detail: str | None = None) -> int:
    """A server that fixes the mode (vLLM's DeepSeek-OCR) encodes every page at that mode."""
    return MODES[mode].vision_tokens(width, height)


def deepseek_ocr_profile(window: int = 8192) -> Profile:
    """The local DeepSeek-OCR backend: Gundam on the page as rendered, the other modes at their
    native size (Large 1280, Base 1024, Small 640, Tiny 512); window 8192 (language_config)."""
    geometry: dict[str, Geometry] = {
        name: None if MODES[name].tiled else (MODES[name].base_size,) * 2 for name in FADING_ORDER
    }
    return Profile(
        "deepseek-ocr", window, geometry, deepseek_ocr_cost, tokens=deepseek_ocr_tokens,
        source="DeepSeek-OCR (deepseek-ai/DeepSeek-OCR): modes tiny 512, small 640, base 1024, "
        "large 1280, gundam 1024 + 640 tiles",
    )


def deepseek_ocr_vllm_profile(mode: str = "gundam", window: int = 8192) -> Profile:
    """DeepSeek-OCR served by vLLM, whose mode is fixed per server (BASE_SIZE 1024,
    IMAGE_SIZE 640, CROP_MODE True by default: Gundam). Under Gundam a page larger than
    640x640 gets local tiles and one no larger gets the 1024 global view only (273 positions),
    so the sharp tiers send the page as rendered and the faint ones a 640x640 page. Under a
    fixed untiled mode every tier costs the same. vLLM takes pixels only, so the memory's own
    vision-token cache does not apply; prefix caching is off in the official vLLM recipe."""
    spec = MODES.get(mode)
    if spec is None:
        raise ValueError(f"unknown DeepSeek-OCR mode {mode!r}; valid modes: {', '.join(MODES)}")
    if spec.tiled:
        geometry: dict[str, Geometry] = {
            "gundam": None, "large": None, "base": (640, 640), "small": (640, 640),
            "tiny": (640, 640),
        }
    else:
        geometry = {name: (spec.base_size, spec.base_size) for name in FADING_ORDER}
    return Profile(
        "deepseek-ocr-vllm", window, geometry, partial(fixed_mode_cost, mode), label_tokens=16,
        tokens=partial(fixed_mode_tokens, mode),
        source="vLLM DeepSeek-OCR processor (BASE_SIZE, IMAGE_SIZE, CROP_MODE per server)",
    )


# --- Qwen2-VL / Qwen2.5-VL --------------------------------------------------------
QWEN_FACTOR = 28  # patch 14 with 2x2 merge: one position per 28x28 pixels
QWEN_MIN_PIXELS = 3136  # 56 * 56, Qwen2VLImageProcessor default min_pixels
QWEN_MAX_PIXELS = 12845056  # 28 * 28 * 16384, Qwen2VLImageProcessor default max_pixels


def qwen_smart_resize(
    width: int, height: int, min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS
) -> tuple[int, int]:
    """Qwen2-VL's `smart_resize`: sides rounded to multiples of 28, area within the bounds."""
    f = QWEN_FACTOR
    w, h = round(width / f) * f, round(height / f) * f
    if w * h > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w, h = max(f, math.floor(width / beta / f) * f), max(f, math.floor(height / beta / f) * f)
    elif w * h < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w, h = math.ceil(width * beta / f) * f, math.ceil(height * beta / f) * f
    return w, h


def qwen_cost(
    tier: str, width: int, height: int, detail: str | None = None, *,
    min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS,
) -> int:
    """Positions of one image: (w / 28) * (h / 28) after smart_resize, plus the
    <|vision_start|> and <|vision_end|> tokens around it."""
    w, h = qwen_smart_resize(width, height, min_pixels, max_pixels)
    return (w // QWEN_FACTOR) * (h // QWEN_FACTOR) + 2


def qwen2_vl_profile(
    window: int = 32768, min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS,
    name: str = "qwen2.5-vl",
) -> Profile:
    """Qwen2-VL / Qwen2.5-VL (Qwen2VLImageProcessor): sides multiples of 28, so nothing is resized
    again on the server; window 32768 (vLLM's usual max_model_len; pass window= for yours)."""
    geometry: dict[str, Geometry] = {
        "gundam": (1260, 1260), "large": (1008, 1008), "base": (812, 812),
        "small": (644, 644), "tiny": (504, 504),
    }
    cost = partial(qwen_cost, min_pixels=min_pixels, max_pixels=max_pixels)
    return Profile(
        name, window, geometry, cost, label_tokens=16,
        tokens=lambda *args: cost(*args) - 2,  # without <|vision_start|> and <|vision_end|>
        source="transformers Qwen2VLImageProcessor: patch 14, merge 2, min_pixels 3136, "
        "max_pixels 12845056",
    )


# --- GPT-4o class -----------------------------------------------------------------
def gpt4o_cost(tier: str, width: int, height: int, detail: str | None = "high") -> int:
    """OpenAI's image cost for GPT-4o-class models: `detail: low` is 85; otherwise the image
    is fitted within 2048x2048, then scaled down so its short side is at most 768, and costs
    85 + 170 per 512x512 tile."""
    if detail == "low":
        return 85
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def gpt4o_profile(window: int = 128000) -> Profile:
    """GPT-4o class (OpenAI vision pricing; window 128k). A square page costs 765 (2x2 tiles
    at 768), 255 (one tile, up to 512) or 85 (`detail: low`)."""
    geometry: dict[str, Geometry] = {
        "gundam": (768, 768), "large": (768, 768), "base": (512, 512),
        "small": (512, 512), "tiny": (512, 512),
    }
    detail = {"gundam": "high", "large": "high", "base": "high", "small": "low", "tiny": "low"}
    return Profile(
        "gpt-4o", window, geometry, gpt4o_cost, detail, label_tokens=16,
        source="OpenAI vision guide: fit 2048, short side 768, 85 + 170 per 512 tile; low 85",
    )


PROFILES: dict[str, Callable[..., Profile]] = {
    "deepseek-ocr": deepseek_ocr_profile,
    "deepseek-ocr-vllm": deepseek_ocr_vllm_profile,
    "qwen2-vl": partial(qwen2_vl_profile, name="qwen2-vl"),
    "qwen2.5-vl": qwen2_vl_profile,
    "gpt-4o": gpt4o_profile,
}


def get_profile(profile: str | Profile, **options: object) -> Profile:
    """A profile by name (options such as `window=` or `mode=` go to its factory)."""
    if isinstance(profile, Profile):
        return profile
    factory = PROFILES.get(profile) if isinstance(profile, str) else None
    if factory is None:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    return factory(**options)
