"""SAM global attention with the relative positions folded into the query-key product.

SAM adds decomposed relative positions to its attention scores:
    score[i, j] = scale * q_i . k_j + q_i . Rh[ih, jh] + q_i . Rw[iw, jw]
transformers (like the reference) materialises that as an [L, L] bias per head,
which for a 64x64 or 80x80 global grid is hundreds of MB per image and keeps
SDPA off its flash kernel. The same scores are a plain dot product of widened
vectors:
    q'_i = [scale * q_i, q_i . Rh[ih, :], q_i . Rw[iw, :]]
    k'_j = [k_j, onehot(jh), onehot(jw)]
so SDPA runs with no bias (scale 1, value zero-padded to the same width). The
result is the same attention, exact up to floating-point rounding; windowed
layers (14x14 windows, small biases) keep transformers' implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2SamVisionAttention,
    DeepseekOcr2SamVisionEncoder,
)


class FoldedRelPosAttention(DeepseekOcr2SamVisionAttention):
    """Drop-in replacement for a global SAM attention layer (same parameters, same names)."""

    def forward(self, hidden_states: torch.Tensor, output_attentions=None) -> tuple[torch.Tensor, None]:
        batch, height, width, _ = hidden_states.shape
        heads, length = self.num_attention_heads, height * width
        # [B, H, W, 3C] -> q, k, v [B, heads, L, d]
        q, k, v = (
            self.qkv(hidden_states).reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        )
        d = q.shape[-1]
        rel_h = self.get_rel_pos(height, height, self.rel_pos_h).to(q.dtype)  # [H, H, d]
        rel_w = self.get_rel_pos(width, width, self.rel_pos_w).to(q.dtype)  # [W, W, d]
        grid_q = q.reshape(batch, heads, height, width, d)
        q_rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h).reshape(batch, heads, length, height)
        q_rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w).reshape(batch, heads, length, width)
        # key j = (jh, jw) row-major: one-hot of its row and of its column
        eye_h = torch.eye(height, dtype=q.dtype, device=q.device).repeat_interleave(width, dim=0)
        eye_w = torch.eye(width, dtype=q.dtype, device=q.device).repeat(height, 1)
        width_qk = d + height + width
        pad = -width_qk % 8  # kernels want head dims in multiples of 8
        query = torch.cat([q * self.scale, q_rel_h, q_rel_w], dim=-1)
        key = torch.cat(
            [
                k,
                eye_h.expand(batch, heads, length, height),
                eye_w.expand(batch, heads, length, width),
            ],
            dim=-1,
        )
        query, key = F.pad(query, (0, pad)), F.pad(key, (0, pad))
        value = F.pad(v, (0, width_qk + pad - d))
        out = F.scaled_dot_product_attention(query, key, value, scale=1.0)[..., :d]
        out = out.permute(0, 2, 1, 3).reshape(batch, height, width, heads * d)
        return self.proj(out), None


def use_folded_rel_pos_attention(sam: DeepseekOcr2SamVisionEncoder) -> None:
    """Switch the global-attention layers of a SAM encoder to `FoldedRelPosAttention`, in place."""
    for layer in sam.layers:
        if layer.window_size == 0 and layer.attn.use_rel_pos:
            layer.attn.__class__ = FoldedRelPosAttention
