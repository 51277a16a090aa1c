"""The DeepSeek-3B-MoE decoder of DeepSeek-OCR, on transformers' own modules.

DeepSeek-OCR's language model is DeepSeek-V2 with plain multi-head attention
(no MLA): layer 0 has a dense MLP, the other layers a mixture of 64 routed and 2
shared experts, top-6 softmax routing with unnormalised weights. transformers
ships exactly this architecture as the DeepSeek-OCR-2 text model, so we build
that and convert the official checkpoint's tensor names at load time: the one
difference is that the official checkpoint stores each routed expert as three
`nn.Linear` weights while transformers stacks them into `gate_up_proj`
[experts, 2 * moe_intermediate, hidden] and `down_proj` [experts, hidden,
moe_intermediate].
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2TextModel,
    DeepseekOcr2TextRMSNorm,
    DeepseekOcr2TextRotaryEmbedding,
)

from optical_memory.backends.deepseek_ocr.configuration import DecoderConfig
from optical_memory.backends.deepseek_ocr.experts import EXPERTS_IMPLEMENTATION
from optical_memory.backends.deepseek_ocr.runtime import DecodeStep

# transformers renamed the text model's `past_key_values` argument to `cache` (the old
# name is deprecated); pass whichever this version takes.
_CACHE_ARGUMENT = (
    "cache"
    if "cache" in inspect.signature(DeepseekOcr2TextModel.forward).parameters
    else "past_key_values"
)


def default_attn_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash-attn 2 when installed and usable (CUDA, half precision), SDPA otherwise."""
    if (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


class FusedRMSNorm(DeepseekOcr2TextRMSNorm):
    """transformers' RMSNorm through torch's fused kernel: one pass over the activations
    instead of seven (a 5x faster norm, 11% of an 8192-token prefill on an H100).
    Statistics in float32 as before; the weight is applied before the one rounding."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = (hidden_states.shape[-1],)
        return F.rms_norm(hidden_states, shape, self.weight, self.variance_epsilon)


class DeepseekOCRDecoder(nn.Module):
    """Text model plus LM head; takes input embeddings so vision tokens can be spliced in."""

    def __init__(
        self,
        config: DecoderConfig,
        attn_implementation: str = "sdpa",
        experts_implementation: str = EXPERTS_IMPLEMENTATION,
    ) -> None:
        super().__init__()
        self.config = config
        hf_config = config.to_transformers()
        hf_config._attn_implementation = attn_implementation
        hf_config._experts_implementation = experts_implementation
        self.model = DeepseekOcr2TextModel(hf_config)
        for module in self.model.modules():
            if type(module) is DeepseekOcr2TextRMSNorm:
                module.__class__ = FusedRMSNorm
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._idle_decode_steps: dict[int, list[DecodeStep]] = {}

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    @contextmanager
    def decode_step(self, batch: int = 1) -> Iterator[DecodeStep]:
        """A `DecodeStep` for `batch` sequences, held for the `with` block.

        Steps are kept and reused (their window-long KV buffers and CUDA
        graphs); concurrent generations each get their own.
        """
        idle = self._idle_decode_steps.setdefault(batch, [])
        step = idle.pop() if idle else DecodeStep(self, batch)
        try:
            yield step
        finally:
            idle.append(step)

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [batch, seq, hidden]
        attention_mask: torch.Tensor | None = None,  # [batch, past + seq]
        position_ids: torch.Tensor | None = None,  # [batch, seq]
        cache: DynamicCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [batch, seq or logits_to_keep, vocab] in float32; fills `cache`.

        `logits_to_keep=1` computes the LM head for the last position only, which
        is all generation needs (the head is 129k wide: at 8192 positions it would
        cost as much as a third of the whole model).
        """
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{_CACHE_ARGUMENT: cache},
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self._lm_head(hidden)

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [batch, seq, vocab]; on the GPU, half-precision weights accumulate
        straight into float32, since logits rounded to bf16 (0.016 apart near 4) tie easily."""
        if not (hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)):
            return self.lm_head(hidden).float()
        flat = hidden.reshape(-1, hidden.shape[-1])  # [batch * seq, hidden]
        logits = torch.mm(flat, self.lm_head.weight.t(), out_dtype=torch.float32)
        return logits.view(*hidden.shape[:-1], -1)


def build_decoder(
    config: DecoderConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    experts_implementation: str = EXPERTS_IMPLEMENTATION,
) -> DeepseekOCRDecoder:
    """A decoder holding exactly `state_dict` (converted names), with no random initialisation.

    The module is created on the meta device and the tensors are assigned, so a
    3B model is not first initialised and then overwritten.
    """
    attn = attn_implementation or default_attn_implementation(device, dtype)
    with torch.device("meta"):
        decoder = DeepseekOCRDecoder(config, attn, experts_implementation)
    expected = set(decoder.state_dict())
    missing = sorted(expected - set(state_dict))
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(f"checkpoint lacks decoder tensors: {shown}")
    for name, param in decoder.state_dict().items():
        got = state_dict[name]
        if tuple(got.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: checkpoint shape {tuple(got.shape)} != expected {tuple(param.shape)}"
            )
        if got.device.type != device.type or got.dtype != dtype:
            raise ValueError(
                f"{name}: tensor on {got.device}/{got.dtype}, expected {device}/{dtype}"
            )
    decoder.load_state_dict(
        {k: v for k, v in state_dict.items() if k in expected}, strict=True, assign=True
    )
    # Non-persistent buffers (the RoPE inverse frequencies) are not in any checkpoint;
    # they stay float32 whatever the weights' dtype, as transformers computes them.
    with torch.device(device):
        decoder.model.rotary_emb = DeepseekOcr2TextRotaryEmbedding(decoder.model.config)
    return decoder.eval()
