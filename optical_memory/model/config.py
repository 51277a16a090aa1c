"""DeepEncoder configuration read from a DeepSeek-OCR checkpoint's `config.json`.

The official file names the sizes that vary between vision towers:
`vision_config.width.sam_vit_b` (width, layers, heads, global_attn_indexes,
downsample_channels), `vision_config.width["clip-l-14-224"]` (width, layers,
heads, patch_size, image_size) and `projector_config` (input_dim, n_embed).
Every size the official file leaves implicit is an optional key of the same
sub-dictionary with the official value as default, so small random
configurations can be written for tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SAM_KEY = "sam_vit_b"
CLIP_KEY = "clip-l-14-224"


class ConfigError(ValueError):
    """config.json lacks the encoder's settings or holds inconsistent sizes."""


@dataclass(frozen=True)
class SamConfig:
    """SAM ViT-B image encoder with its neck and the two stride-2 convolutions."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    downsample_channels: tuple[int, int] = (512, 1024)
    # implicit in the official config.json
    image_size: int = 1024  # pretraining size of the absolute position embedding
    patch_size: int = 16
    window_size: int = 14
    out_channels: int = 256  # neck channels
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6


@dataclass(frozen=True)
class ClipConfig:
    """CLIP-L/14 trunk; its patch embeddings are the SAM features."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    patch_size: int = 14
    image_size: int = 224  # pretraining size: a 16x16 grid of position embeddings + class token
    # implicit in the official config.json
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ProjectorConfig:
    """Linear projector from the concatenated CLIP + SAM features to the decoder width."""

    input_dim: int = 2048
    n_embed: int = 1280


@dataclass(frozen=True)
class EncoderConfig:
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)

    def __post_init__(self) -> None:
        sam_out = self.sam.downsample_channels[-1]
        if sam_out != self.clip.width:
            raise ConfigError(
                f"SAM output channels {sam_out} must equal the CLIP width {self.clip.width}"
            )
        if self.projector.input_dim != self.clip.width + sam_out:
            raise ConfigError(
                f"projector input_dim {self.projector.input_dim} must equal CLIP width + SAM "
                f"channels = {self.clip.width + sam_out}"
            )
        for name, width, heads in (
            ("sam_vit_b", self.sam.width, self.sam.heads),
            ("clip-l-14-224", self.clip.width, self.clip.heads),
        ):
            if width % heads:
                raise ConfigError(f"{name}: width {width} is not divisible by heads {heads}")

    @property
    def hidden_size(self) -> int:
        """Width of the vision tokens handed to the decoder."""
        return self.projector.n_embed

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> EncoderConfig:
        """Read the encoder settings of a full DeepSeek-OCR `config.json` dictionary."""
        try:
            widths = config["vision_config"]["width"]
            sam, clip = dict(widths[SAM_KEY]), dict(widths[CLIP_KEY])
            projector = dict(config["projector_config"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                "config.json has no DeepEncoder settings: expected vision_config.width."
                f"{SAM_KEY}, vision_config.width.{CLIP_KEY} and projector_config (missing {exc})"
            ) from None
        if projector.get("projector_type", "linear") != "linear":
            raise ConfigError(f"unsupported projector_type {projector['projector_type']!r}")
        return cls(
            sam=_build(SamConfig, sam, SAM_KEY),
            clip=_build(ClipConfig, clip, CLIP_KEY),
            projector=_build(ProjectorConfig, projector, "projector_config"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> EncoderConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """The `vision_config` and `projector_config` entries of a config.json, all keys explicit."""
        sam, clip = asdict(self.sam), asdict(self.clip)
        sam["global_attn_indexes"] = list(sam["global_attn_indexes"])
        sam["downsample_channels"] = list(sam["downsample_channels"])
        return {
            "vision_config": {"model_type": "vision", "width": {SAM_KEY: sam, CLIP_KEY: clip}},
            "projector_config": {
                "model_type": "mlp_projector",
                "projector_type": "linear",
                **asdict(self.projector),
            },
        }


_IGNORED_KEYS = {"model_type", "projector_type"}


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    known = set(kind.__dataclass_fields__)
    unknown = set(values) - known - _IGNORED_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {k: v for k, v in values.items() if k in known}
    for key in ("global_attn_indexes", "downsample_channels"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return kind(**kwargs)
