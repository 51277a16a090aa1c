"""One-token decoder steps over a static KV cache, replayed from a CUDA graph.

A decode step is a few hundred small kernels (12 layers of attention, routing
and experts). Launched one by one from Python a step takes 16-18 ms on an H100;
captured once in a CUDA graph and replayed, 2.5 ms (benchmarks/decoder_gpu.py,
batch 1). A graph needs fixed addresses,
so the keys and values live in buffers as long as the decoder's window, and the
new token's slot and a boolean mask of the filled positions are device tensors
set before each replay. The prompt is prefilled as usual (causal attention over
the prompt alone) and its keys and values copied into the buffers.

Where the experts read group sizes on the host (the CPU, float32; see
`uses_grouped_kernel`) the same step runs eagerly over the same buffers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from optical_memory.model.experts import uses_grouped_kernel

if TYPE_CHECKING:
    from optical_memory.model.decoder import DeepseekOCRDecoder


class StaticKVCache:
    """Keys and values [layers, batch, heads, max_len, head_dim] at fixed addresses.

    Implements the part of transformers' cache protocol a one-token step uses:
    `update` stores the step's keys and values at `slot` and returns the whole
    window; the attention mask says which positions are filled.
    """

    def __init__(
        self,
        layers: int,
        batch: int,
        heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (layers, batch, heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [batch, heads, 1, head_dim]
        self.keys[layer_idx].index_copy_(2, self.slot, key_states)
        self.values[layer_idx].index_copy_(2, self.slot, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class DecodeStep:
    """Prefill once, then one token per call, for `batch` sequences of equal length.

    Get one from `DeepseekOCRDecoder.decode_step(batch)`, which reuses steps
    (and their captured graphs) across generations.
    """

    def __init__(self, decoder: DeepseekOCRDecoder, batch: int) -> None:
        cfg = decoder.config
        device, dtype = decoder.device, decoder.dtype
        self.decoder = decoder
        self.batch = batch
        self.max_len = cfg.max_position_embeddings
        self.cache = StaticKVCache(
            cfg.num_hidden_layers,
            batch,
            cfg.num_key_value_heads,
            self.max_len,
            cfg.head_dim,
            device=device,
            dtype=dtype,
        )
        self.mask = torch.zeros(batch, 1, 1, self.max_len, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.length = 0  # filled positions
        self.use_graph = uses_grouped_kernel(device, dtype)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None

    @torch.no_grad()
    def prefill(
        self,
        inputs_embeds: torch.Tensor,  # [batch, seq, hidden]
        position_ids: torch.Tensor,  # [batch, seq]
    ) -> torch.Tensor:
        """Logits [batch, vocab] (float32) of the last prompt position; the cache holds the prompt."""
        batch, seq = inputs_embeds.shape[:2]
        if batch != self.batch:
            raise ValueError(f"prefill of batch {batch} on a decode step of batch {self.batch}")
        if seq >= self.max_len:
            raise ValueError(f"prompt of {seq} positions leaves no room in the {self.max_len} window")
        cache = self.decoder.new_cache()
        logits = self.decoder(
            inputs_embeds, position_ids=position_ids, past_key_values=cache, logits_to_keep=1
        )[:, -1]
        for i, layer in enumerate(cache.layers):
            self.cache.keys[i, :, :, :seq].copy_(layer.keys)
            self.cache.values[i, :, :, :seq].copy_(layer.values)
        self.mask.zero_()
        self.mask[..., :seq] = True
        self.length = seq
        return logits

    @torch.no_grad()
    def __call__(
        self,
        tokens: torch.Tensor,  # [batch, 1] long
        position_ids: torch.Tensor,  # [batch, 1] long
    ) -> torch.Tensor:
        """Logits [batch, vocab] (float32) after appending `tokens` at the next position."""
        if self.length == 0:
            raise RuntimeError("decode step called before prefill")
        if self.length >= self.max_len:
            raise ValueError(f"the {self.max_len}-position decoder window is full")
        self.tokens.copy_(tokens)
        self.positions.copy_(position_ids)
        self.cache.slot.fill_(self.length)
        self.mask[..., self.length] = True
        self.length += 1
        if not self.use_graph:
            return self._forward()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._graph_logits.clone()

    def _forward(self) -> torch.Tensor:
        return self.decoder(
            self.decoder.embed_tokens(self.tokens),
            attention_mask=self.mask,
            position_ids=self.positions,
            past_key_values=self.cache,
        )[:, -1]

    def _capture(self) -> None:
        # Warm-up on a side stream (lazy initialisations, cuBLAS handles) computes
        # this very step, so its writes to the cache are the ones the replay makes.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = self._forward()
        self._graph = graph
