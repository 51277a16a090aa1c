"""Faster SAM modules with the same parameters and the same results as transformers' SAM encoder.

Global attention. SAM adds decomposed relative positions to its scores:
    score[i, j] = scale * q_i . k_j + q_i . Rh[ih, jh] + q_i . Rw[iw, jw]
transformers (like the reference) materialises that as an [L, L] bias per head,
which for a 64x64 or 80x80 global grid is hundreds of MB per image and keeps
SDPA off its flash kernels. The same scores are a plain dot product of widened
vectors:
    q'_i = [scale * q_i, q_i . Rh[ih, :], q_i . Rw[iw, :]]
    k'_j = [k_j, onehot(jh), onehot(jw)]
so SDPA runs with no bias (scale 1, value zero-padded to the same width).
Windowed layers (14x14 windows, small biases) keep transformers' biased SDPA.

Relative position tables are looked up with indices made on the tables' device
(transformers builds them on the CPU: a host-to-device copy and a stream
synchronisation per layer) and resized in fp32 as the reference does. The
16x16 patch embedding runs as one GEMM over unfolded patches instead of a
3-channel convolution, which cuDNN serves with a slow kernel.

All of it is the same arithmetic up to floating-point rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2SamPatchEmbeddings,
    DeepseekOcr2SamVisionAttention,
    DeepseekOcr2SamVisionEncoder,
    DeepseekOcr2SamVisionSdpaAttention,
)


class RelPosOnDevice:
    """`get_rel_pos` for equal query and key sizes (always the case in SAM) without host round trips."""

    def get_rel_pos(self, q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
        if q_size != k_size:
            return super().get_rel_pos(q_size, k_size, rel_pos)
        distances = 2 * q_size - 1
        if rel_pos.shape[0] != distances:  # [L, d] -> [distances, d], linear, in fp32
            resized = F.interpolate(rel_pos.float().T[None], size=distances, mode="linear")
            rel_pos = resized[0].T.to(rel_pos.dtype)
        pos = torch.arange(q_size, device=rel_pos.device)
        return rel_pos[pos[:, None] - pos[None, :] + (q_size - 1)]  # [q, k, head_dim]


class WindowRelPosAttention(RelPosOnDevice, DeepseekOcr2SamVisionSdpaAttention):
    """transformers' SDPA attention with a relative-position bias, for the windowed layers."""


class FoldedRelPosAttention(RelPosOnDevice, DeepseekOcr2SamVisionAttention):
    """Drop-in replacement for a global SAM attention layer (same parameters, same names)."""

    def forward(
        self, hidden_states: torch.Tensor, output_attentions=None
    ) -> tuple[torch.Tensor, None]:
        batch, height, width, _ = hidden_states.shape
        heads, length = self.num_attention_heads, height * width
        # [B, H, W, 3C] -> q, k, v [B, heads, L, d] (strided views)
        q, k, v = (
            self.qkv(hidden_states)
            .reshape(batch, length, 3, heads, -1)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        d = q.shape[-1]
        rel_h = self.get_rel_pos(height, height, self.rel_pos_h).to(q.dtype)  # [H, H, d]
        rel_w = self.get_rel_pos(width, width, self.rel_pos_w).to(q.dtype)  # [W, W, d]
        grid_q = q.reshape(batch, heads, height, width, d)
        a, b = d + height, d + height + width
        wide = b + (-b % 8)  # kernels want head dims in multiples of 8
        query = q.new_zeros(batch, heads, length, wide)
        key = q.new_zeros(batch, heads, length, wide)
        torch.mul(q, self.scale, out=query[..., :d])
        query[..., d:a] = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h).reshape(
            batch, heads, length, height
        )
        query[..., a:b] = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w).reshape(
            batch, heads, length, width
        )
        # key j = (jh, jw) row-major: one-hot of its row and of its column
        key[..., :d] = k
        key[..., d:a].view(batch, heads, height, width, height).diagonal(dim1=2, dim2=4).fill_(1)
        key[..., a:b].view(batch, heads, height, width, width).diagonal(dim1=3, dim2=4).fill_(1)
        value = F.pad(v, (0, wide - d))
        out = F.scaled_dot_product_attention(query, key, value, scale=1.0)[..., :d]
        out = out.permute(0, 2, 1, 3).reshape(batch, height, width, heads * d)
        return self.proj(out), None


class PatchEmbedAsLinear(DeepseekOcr2SamPatchEmbeddings):
    """The non-overlapping patch convolution as one GEMM: [B, 3, S, S] -> [B, S/p, S/p, C]."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = pixel_values.shape
        ph, pw = self.patch_size
        patches = (
            pixel_values.reshape(batch, channels, height // ph, ph, width // pw, pw)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(batch, height // ph, width // pw, channels * ph * pw)
        )
        weight = self.projection.weight.reshape(self.projection.out_channels, -1)
        return F.linear(patches, weight, self.projection.bias)


def use_fast_sam_modules(sam: DeepseekOcr2SamVisionEncoder) -> None:
    """Switch a SAM encoder's modules to the classes above, in place (same parameters)."""
    sam.patch_embed.__class__ = PatchEmbedAsLinear
    for layer in sam.layers:
        if layer.attn.use_rel_pos:
            global_ = layer.window_size == 0
            layer.attn.__class__ = FoldedRelPosAttention if global_ else WindowRelPosAttention
