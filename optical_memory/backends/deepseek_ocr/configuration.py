"""DeepSeek-OCR configuration read from a checkpoint's `config.json`: DeepEncoder and decoder.

Plain data (no torch), so a backend can read the window and sizes without loading the model.
For the encoder, the official file names the sizes that vary between vision towers:
`vision_config.width.sam_vit_b` (width, layers, heads, global_attn_indexes,
downsample_channels), `vision_config.width["clip-l-14-224"]` (width, layers,
heads, patch_size, image_size) and `projector_config` (input_dim, n_embed).
Every size the official file leaves implicit is an optional key of the same
sub-dictionary with the official value as default, so small random
configurations can be written for tests.

A config.json is read as hostile: every size must be an integer (a float a
finite number) within `BOUNDS`, generous limits (4x to 16x the official values)
checked when the configuration is built, before any module or tensor is
allocated from it; a value out of bounds raises ConfigError naming the key and
the bound.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import (
        DeepseekOcr2TextConfig,
    )

SAM_KEY = "sam_vit_b"
CLIP_KEY = "clip-l-14-224"


class CheckpointError(ValueError):
    """A checkpoint directory cannot be loaded; the message lists every problem found."""


class ConfigError(CheckpointError):
    """config.json lacks the encoder's settings or holds inconsistent or unbounded sizes."""


# (lowest, highest) accepted value of each size, by section and key. The official values
# (deepseek-ai/DeepSeek-OCR config.json) are in the dataclasses below; the upper bounds are
# 4x to 16x those, far past any released variant, and small enough that building the
# modules on the meta device and checking tensor shapes stays fast.
BOUNDS: dict[str, dict[str, tuple[float, float]]] = {
    "sam_vit_b": {
        "width": (1, 4096),  # 768
        "layers": (1, 64),  # 12
        "heads": (1, 128),  # 12
        "downsample_channels": (1, 8192),  # (512, 1024), each
        "image_size": (16, 4096),  # 1024
        "patch_size": (1, 64),  # 16
        "window_size": (1, 256),  # 14
        "out_channels": (1, 4096),  # 256
        "mlp_ratio": (0.01, 16.0),  # 4.0
        "layer_norm_eps": (0.0, 1.0),  # 1e-6
    },
    "clip-l-14-224": {
        "width": (1, 8192),  # 1024
        "layers": (1, 128),  # 24
        "heads": (1, 128),  # 16
        "patch_size": (1, 64),  # 14
        "image_size": (1, 1024),  # 224
        "intermediate_size": (1, 32768),  # 4096
        "layer_norm_eps": (0.0, 1.0),  # 1e-5
    },
    "projector_config": {
        "input_dim": (1, 16384),  # 2048
        "n_embed": (1, 8192),  # 1280
    },
    "language_config": {
        "vocab_size": (1, 1_048_576),  # 129280
        "hidden_size": (1, 8192),  # 1280
        "intermediate_size": (1, 32768),  # 6848
        "moe_intermediate_size": (1, 8192),  # 896
        "num_hidden_layers": (1, 128),  # 12
        "num_attention_heads": (1, 128),  # 10
        "num_key_value_heads": (1, 128),  # 10
        "n_routed_experts": (1, 512),  # 64
        "n_shared_experts": (1, 16),  # 2
        "num_experts_per_tok": (1, 512),  # 6 (and at most n_routed_experts)
        "first_k_dense_replace": (0, 128),  # 1 (and at most num_hidden_layers)
        "max_position_embeddings": (1, 65536),  # 8192
        "bos_token_id": (0, 1_048_575),  # 0 (and below vocab_size)
        "eos_token_id": (0, 1_048_575),  # 1 (and below vocab_size)
        "routed_scaling_factor": (0.0, 1000.0),  # 1.0
        "rms_norm_eps": (0.0, 1.0),  # 1e-6
        "rope_theta": (1.0, 1e9),  # 10000
    },
}
# Parameters of the decoder at most (the official one has 2.9 billion): each size within
# its bound can still multiply into far more than any machine holds.
MAX_DECODER_PARAMETERS = 16_000_000_000
# Bytes of one sequence's window-long KV cache in bf16 (a decode step allocates it; the
# official decoder's is 0.5 GB).
MAX_KV_CACHE_BYTES = 32 * 2**30


def _where(section: str) -> str:
    """Where a section sits in config.json."""
    return f"vision_config.width.{section}" if section in (SAM_KEY, CLIP_KEY) else section


def _check_value(section: str, key: str, value: Any, kind: type) -> None:
    low, high = BOUNDS[section][key]
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        what = "a finite number"
    if not ok:
        raise ConfigError(
            f"config.json {_where(section)}.{key} must be {what}, got {str(value)[:40]!r}"
        )
    # floats: low is exclusive (an epsilon or a scale of 0 is no setting); ints: inclusive
    inside = (low <= value <= high) if kind is int else (low < value <= high)
    if not inside:
        bracket = "[" if kind is int else "("
        raise ConfigError(
            f"config.json {_where(section)}.{key} = {value} is out of bounds: "
            f"expected {bracket}{low}, {high}]"
        )


def _check_fields(obj: Any, section: str) -> None:
    """Every bounded field of a config dataclass, in declaration order."""
    for f in fields(obj):
        if f.name not in BOUNDS[section]:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, tuple):
            for item in value:
                _check_value(section, f.name, item, int)
        else:
            kind = float if isinstance(BOUNDS[section][f.name][1], float) else int
            _check_value(section, f.name, value, kind)


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

    def __post_init__(self) -> None:
        where = f"config.json {_where(SAM_KEY)}"
        for key in ("global_attn_indexes", "downsample_channels"):
            value = getattr(self, key)
            if not isinstance(value, tuple) or len(value) > 2 * BOUNDS[SAM_KEY]["layers"][1]:
                raise ConfigError(f"{where}.{key} must be a short list")
        if len(self.downsample_channels) != 2:
            raise ConfigError(f"{where}.downsample_channels must hold 2 sizes")
        _check_fields(self, SAM_KEY)
        for i in self.global_attn_indexes:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.layers:
                raise ConfigError(
                    f"{where}.global_attn_indexes: {str(i)[:20]} is not a layer "
                    f"in [0, {self.layers - 1}]"
                )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{where}.image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )


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

    def __post_init__(self) -> None:
        _check_fields(self, CLIP_KEY)
        if self.image_size < self.patch_size:
            raise ConfigError(
                f"config.json {_where(CLIP_KEY)}.image_size {self.image_size} is below its "
                f"patch_size {self.patch_size}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ProjectorConfig:
    """Linear projector from the concatenated CLIP + SAM features to the decoder width."""

    input_dim: int = 2048
    n_embed: int = 1280

    def __post_init__(self) -> None:
        _check_fields(self, "projector_config")


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
            kind = str(projector["projector_type"])[:40]
            raise ConfigError(f"unsupported projector_type {kind!r}")
        return cls(
            sam=_build(SamConfig, sam, SAM_KEY),
            clip=_build(ClipConfig, clip, CLIP_KEY),
            projector=_build(ProjectorConfig, projector, "projector_config"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> EncoderConfig:
        """Read a config.json of at most 4 MiB (the official one has 3 KB)."""
        with open(path, "rb") as f:
            data = f.read(4 * 2**20 + 1)
        if len(data) > 4 * 2**20:
            raise ConfigError(f"{path}: more than the 4 MiB a config.json may have")
        try:
            return cls.from_dict(json.loads(data))
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{path}: not JSON ({str(exc)[:200]})") from None

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
            if not isinstance(kwargs[key], list):
                raise ConfigError(f"config.json {where}.{key} must be a list")
            kwargs[key] = tuple(kwargs[key])
    return kind(**kwargs)


@dataclass(frozen=True)
class DecoderConfig:
    """The checkpoint's `language_config`, restricted to what this architecture uses."""

    vocab_size: int = 129280
    hidden_size: int = 1280
    intermediate_size: int = 6848
    moe_intermediate_size: int = 896
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int = 10
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: int = 1

    @classmethod
    def from_checkpoint_config(cls, config: Mapping[str, Any]) -> DecoderConfig:
        """Read `language_config` of a DeepSeek-OCR config.json (or a flat text config).

        Settings this architecture does not implement (MLA, sigmoid scoring,
        normalised top-k weights, MoE every n-th layer) raise ValueError rather
        than being silently ignored. Sizes out of `BOUNDS` raise ConfigError naming the key.
        """
        if not isinstance(config, Mapping):
            raise ConfigError("config.json must hold a JSON object")
        lang = config.get("language_config", config)
        if not isinstance(lang, Mapping):
            raise ConfigError("config.json language_config must be a JSON object")
        lang = dict(lang)
        unsupported = {
            "use_mla": (lang.get("use_mla", False), False),
            "scoring_func": (lang.get("scoring_func", "softmax"), "softmax"),
            "norm_topk_prob": (lang.get("norm_topk_prob", False), False),
            "moe_layer_freq": (lang.get("moe_layer_freq", 1), 1),
        }
        for key, (value, expected) in unsupported.items():
            if value != expected:
                raise ConfigError(
                    f"decoder config: {key}={str(value)[:40]!r} is not supported "
                    f"(expected {expected!r})"
                )
        if lang.get("topk_method", "greedy") not in ("greedy", "group_limited_greedy"):
            raise ConfigError(
                f"decoder config: topk_method={str(lang['topk_method'])[:40]!r} is not supported"
            )
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in lang.items() if k in names and v is not None}
        if "num_key_value_heads" not in values and "num_attention_heads" in values:
            values["num_key_value_heads"] = values["num_attention_heads"]
        return cls(**values)

    def __post_init__(self) -> None:
        section = "language_config"
        _check_fields(self, section)
        limits = (
            ("num_experts_per_tok", "n_routed_experts"),
            ("first_k_dense_replace", "num_hidden_layers"),
        )
        for key, bound in limits:
            if getattr(self, key) > getattr(self, bound):
                raise ConfigError(
                    f"config.json {section}.{key} = {getattr(self, key)} is out of bounds: "
                    f"at most {bound} = {getattr(self, bound)}"
                )
        for key in ("bos_token_id", "eos_token_id"):
            if getattr(self, key) >= self.vocab_size:
                raise ConfigError(
                    f"config.json {section}.{key} = {getattr(self, key)} is out of bounds: "
                    f"below vocab_size = {self.vocab_size}"
                )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config.json {section}.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json {section}.num_attention_heads {self.num_attention_heads} is not "
                f"divisible by num_key_value_heads {self.num_key_value_heads}"
            )
        if not isinstance(self.topk_method, str):
            raise ConfigError(f"config.json {section}.topk_method must be a string")
        if self.parameter_count() > MAX_DECODER_PARAMETERS:
            raise ConfigError(
                f"config.json {section}: a decoder of {self.parameter_count():,} parameters is "
                f"out of bounds: at most {MAX_DECODER_PARAMETERS:,}"
            )
        kv_bytes = self.kv_cache_bytes_per_token() * self.max_position_embeddings
        if kv_bytes > MAX_KV_CACHE_BYTES:
            raise ConfigError(
                f"config.json {section}: a KV cache of {kv_bytes:,} bytes (max_position_embeddings "
                f"{self.max_position_embeddings}) is out of bounds: at most {MAX_KV_CACHE_BYTES:,}"
            )

    def parameter_count(self) -> int:
        """Parameters of the decoder this configuration describes (computed, not allocated)."""
        h, heads, kv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        attention = 2 * h * heads * self.head_dim + 2 * h * kv * self.head_dim
        dense = 3 * h * self.intermediate_size
        n_experts = self.n_routed_experts + self.n_shared_experts
        moe = 3 * h * self.moe_intermediate_size * n_experts + self.n_routed_experts * h
        n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
        layers = self.num_hidden_layers * (attention + 2 * h) + n_dense * dense
        layers += (self.num_hidden_layers - n_dense) * moe
        return layers + 2 * self.vocab_size * h + h

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of keys and values one position holds in the KV cache, all layers (default bf16)."""
        itemsize = 2 if dtype is None else dtype.itemsize
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize

    def to_transformers(self) -> DeepseekOcr2TextConfig:
        from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import (
            DeepseekOcr2TextConfig,
        )

        n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
        return DeepseekOcr2TextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            moe_intermediate_size=self.moe_intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            n_routed_experts=self.n_routed_experts,
            n_shared_experts=self.n_shared_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            routed_scaling_factor=self.routed_scaling_factor,
            topk_method=self.topk_method,
            n_group=1,
            topk_group=1,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            mlp_layer_types=["dense"] * n_dense + ["sparse"] * (self.num_hidden_layers - n_dense),
            tie_word_embeddings=False,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
