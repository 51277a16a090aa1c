"""DeepEncoder: SAM ViT-B -> two stride-2 convolutions -> CLIP-L/14 trunk -> linear projector.

Reused from transformers: the SAM ViT-B encoder of DeepSeek-OCR-2 (windowed and
global attention with decomposed relative positions, neck, the two stride-2
convolutions; same shapes as DeepSeek-OCR's) and CLIP's encoder layers. Written
here: the glue transformers lacks - the CLIP trunk whose patch embeddings are
the SAM features (class token + bicubic-interpolated position embeddings), the
projector, and the token layout with `image_newline` / `view_seperator`.

Shapes for the official sizes and a 1024x1024 view: pixels [B, 3, 1024, 1024]
-> SAM [B, 1024, 16, 16] -> CLIP [B, 257, 1024] -> concat [B, 256, 2048]
-> projector [B, 256, 1280].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.clip.configuration_clip import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoder
from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import (
    DeepseekOcr2SamVisionConfig,
)
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2SamVisionEncoder,
)

from optical_memory.backends.deepseek_ocr.configuration import ClipConfig, EncoderConfig, SamConfig
from optical_memory.backends.deepseek_ocr.sam_attention import use_fast_sam_modules

SAM_IMPLEMENTATIONS = ("fast", "transformers")


def clip_attn_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash-attn for the CLIP trunk when it is installed and usable, SDPA otherwise."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


def build_sam(config: SamConfig, implementation: str = "fast") -> DeepseekOcr2SamVisionEncoder:
    """transformers' SAM encoder; "fast" swaps in the modules of `sam_attention` (same results)."""
    if implementation not in SAM_IMPLEMENTATIONS:
        valid = ", ".join(SAM_IMPLEMENTATIONS)
        raise ValueError(f"unknown SAM implementation {implementation!r}; valid: {valid}")
    hf_config = DeepseekOcr2SamVisionConfig(
        hidden_size=config.width,
        output_channels=config.out_channels,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        layer_norm_eps=config.layer_norm_eps,
        mlp_ratio=config.mlp_ratio,
        window_size=config.window_size,
        global_attn_indexes=list(config.global_attn_indexes),
        downsample_channels=list(config.downsample_channels),
    )
    hf_config._attn_implementation = "sdpa"
    sam = DeepseekOcr2SamVisionEncoder(hf_config)
    if implementation == "fast":
        use_fast_sam_modules(sam)
    return sam


class ClipTrunk(nn.Module):
    """CLIP-L/14 whose patch embeddings are given (the SAM features) instead of computed from pixels.

    Parameter names follow the official checkpoint (`embeddings.class_embedding`,
    `embeddings.position_embedding`, `pre_layrnorm`, `transformer.layers.*`); the
    fused `qkv_proj` of the checkpoint is split into transformers' q/k/v at load.
    There is no post-layernorm: the reference uses the last layer's output as is.
    """

    def __init__(self, config: ClipConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.grid = config.grid
        hf_config = CLIPVisionConfig(
            hidden_size=config.width,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
            hidden_act="quick_gelu",
            layer_norm_eps=config.layer_norm_eps,
            attention_dropout=0.0,
        )
        hf_config._attn_implementation = attn_implementation
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.randn(config.width))
        self.embeddings.position_embedding = nn.Embedding(self.grid * self.grid + 1, config.width)
        self.pre_layrnorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.transformer = CLIPEncoder(hf_config)

    def position_embeddings(self, side: int) -> torch.Tensor:
        """[1 + side*side, width]: class position, then the 2-D grid resized bicubically (antialiased, fp32)."""
        table = self.embeddings.position_embedding.weight
        if side == self.grid:
            return table
        grid = table[1:].view(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid.float(), size=(side, side), mode="bicubic", antialias=True, align_corners=False
        ).to(table.dtype)
        return torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(side * side, -1)])

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        # patch_embeds: [B, width, h, w] (SAM output) -> [B, 1 + h*w, width]
        batch, width, h, w = patch_embeds.shape
        side = math.isqrt(h * w + 1)  # as the reference: floor(sqrt(tokens + class))
        x = torch.cat(
            [
                self.embeddings.class_embedding.expand(batch, 1, width),
                patch_embeds.flatten(2).transpose(1, 2),
            ],
            dim=1,
        )
        x = self.pre_layrnorm(x + self.position_embeddings(side))
        return self.transformer(inputs_embeds=x).last_hidden_state


class LinearProjector(nn.Module):
    def __init__(self, input_dim: int, n_embed: int) -> None:
        super().__init__()
        self.layers = nn.Linear(input_dim, n_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DeepEncoder(nn.Module):
    """The vision tower of DeepSeek-OCR; module names mirror `model.*` of the checkpoint."""

    def __init__(
        self,
        config: EncoderConfig,
        clip_attn_implementation: str = "sdpa",
        sam_implementation: str = "fast",
    ) -> None:
        super().__init__()
        self.config = config
        n_embed = config.projector.n_embed
        self.sam_model = build_sam(config.sam, sam_implementation)
        self.vision_model = ClipTrunk(config.clip, clip_attn_implementation)
        self.projector = LinearProjector(config.projector.input_dim, n_embed)
        self.image_newline = nn.Parameter(torch.randn(n_embed) / math.sqrt(n_embed))
        self.view_seperator = nn.Parameter(torch.randn(n_embed) / math.sqrt(n_embed))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised views [B, 3, S, S] -> per-view features [B, (S/64)^2, n_embed], row-major."""
        sam = self.sam_model(pixels).last_hidden_state  # [B, C, S/64, S/64]
        clip = self.vision_model(sam)  # [B, 1 + (S/64)^2, width]
        features = torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)
        return self.projector(features)

    def layout(
        self,
        global_features: torch.Tensor,
        tile_features: torch.Tensor | None = None,
        tile_grid: tuple[int, int] = (1, 1),
    ) -> torch.Tensor:
        """One image's vision tokens [n_tokens, n_embed] in the reference order.

        global_features: [h*w, C] of the global view; tile_features: [n, h2*w2, C]
        of the local tiles, row by row, for a `tile_grid` of (across, down). Tiles
        are stitched into one (down*h2) x (across*w2) grid; every grid row is
        followed by `image_newline`; the image is local grid, global grid, then
        `view_seperator`. Written straight into one output tensor.
        """
        n_embed = global_features.shape[-1]
        # (features [n, side*side, C], (across, down)): local tiles first, then the global view
        grids = [(global_features[None], (1, 1))]
        if tile_features is not None and tile_features.shape[0]:
            grids.insert(0, (tile_features, tile_grid))
        total = 1
        for features, (across, down) in grids:
            side = math.isqrt(features.shape[1])
            total += down * side * (across * side + 1)
        out = global_features.new_empty(total, n_embed)
        start = 0
        for features, (across, down) in grids:
            side = math.isqrt(features.shape[1])
            rows, cols = down * side, across * side
            block = out[start : start + rows * (cols + 1)].view(rows, cols + 1, n_embed)
            # block[:, :cols] seen as [down, side, across, side, C] <- tiles [down, across, side, side, C]
            block[:, :cols].unflatten(0, (down, side)).unflatten(2, (across, side)).copy_(
                features.view(down, across, side, side, n_embed).permute(0, 2, 1, 3, 4)
            )
            block[:, cols] = self.image_newline
            start += rows * (cols + 1)
        out[start] = self.view_seperator
        return out
