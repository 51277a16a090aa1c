"""The runtime of the model on a device: the encoder with CUDA graphs per input shape, and
one-token decoder steps over a static KV cache, replayed from a CUDA graph.

Encoder: a loaded DeepEncoder with its preprocessing and the token layout;
`encode(page, "base")` gives [273, 1280], `encode_batch(pages, "gundam")` runs
one forward pass per view size.

Decoder steps:
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

import threading

import torch
from PIL import Image

from optical_memory.backends.deepseek_ocr.configuration import EncoderConfig
from optical_memory.backends.deepseek_ocr.experts import uses_grouped_kernel
from optical_memory.backends.deepseek_ocr.modeling_deepencoder import (
    DeepEncoder,
    clip_attn_implementation,
)
from optical_memory.backends.deepseek_ocr.preprocess import Views, make_views, normalize
from optical_memory.backends.deepseek_ocr.weights import (
    encoder_fingerprint,
    resolve_device_dtype,
    to_internal,
)
from optical_memory.modes import Mode, get_mode


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

    def __init__(self, decoder: torch.nn.Module, batch: int) -> None:  # a DeepseekOCRDecoder
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
            inputs_embeds, position_ids=position_ids, cache=cache, logits_to_keep=1
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
            cache=self.cache,
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
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._graph_logits = self._forward()
        self._graph = graph


MAX_CUDA_GRAPHS = 24


def graph_batch(n: int) -> int:
    """The batch a CUDA graph of the encoder is captured for: powers of two up to 8, then
    multiples of 8 (at most 7 padding rows, under half the batch)."""
    if n <= 8:
        return 1 << (n - 1).bit_length()
    return -(-n // 8) * 8


class Encoder:
    """A loaded DeepEncoder on one device and dtype, with preprocessing and the token layout."""

    def __init__(
        self,
        model: DeepEncoder,
        fingerprint: str,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool = False,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.fingerprint = fingerprint
        self.device = device
        self.dtype = dtype
        self.config = model.config
        # input shape -> (graph, static input, static output), oldest first
        self._graphs: dict[tuple[int, ...], tuple] | None = None
        self._graph_lock = threading.Lock()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if cuda_graphs:
            self.enable_cuda_graphs()

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def cache_id(self) -> str:
        """What cached embeddings depend on: the weights and the dtype they were computed in
        (a bf16 GPU process and a float32 CPU process sharing a store keep separate entries)."""
        return f"{self.fingerprint}/{str(self.dtype).removeprefix('torch.')}"

    @classmethod
    def from_tensors(
        cls,
        config: EncoderConfig,
        tensors: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        sam_implementation: str = "fast",
        cuda_graphs: bool | None = None,
    ) -> Encoder:
        """Build from official-named tensors (already checked against `config`).

        `cuda_graphs` defaults to on for CUDA devices (see `enable_cuda_graphs`).
        """
        device, dtype = resolve_device_dtype(device, dtype)
        with torch.device("meta"):
            model = DeepEncoder(config, clip_attn_implementation(device, dtype), sam_implementation)
        names = list(model.state_dict())
        state = {
            k: v.to(device=device, dtype=dtype) for k, v in to_internal(tensors, names).items()
        }
        model.load_state_dict(state, strict=True, assign=True)
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        return cls(model, encoder_fingerprint(config, tensors), device, dtype, cuda_graphs)

    def enable_cuda_graphs(self) -> None:
        """Replay one captured CUDA graph per input shape instead of launching kernels one by one.

        Removes the launch overhead that dominates small batches, and leaves the
        host (and its interpreter lock) free for other threads while the GPU works.
        Batches are padded to `graph_batch` sizes, so a queue's varied batches
        reuse a few graphs; each is captured on first use (tens of milliseconds),
        the `MAX_CUDA_GRAPHS` most recent are kept, and all share one memory pool
        (replays take a lock and copy their output out).
        """
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._graphs = {}
        self._graph_pool = torch.cuda.graph_pool_handle()

    def compile(self) -> None:
        """torch.compile every SAM and CLIP layer in place (fuses the elementwise work).

        Each new view size and batch size compiles on its first call (tens of
        seconds). Measured on an H100 (README): faster at Tiny, slower at Base,
        so it is not on by default.
        """
        for layer in (*self.model.sam_model.layers, *self.model.vision_model.transformer.layers):
            layer.compile()

    @torch.inference_mode()
    def encode(self, image: Image.Image, mode: str | Mode) -> torch.Tensor:
        """Vision tokens of one image at `mode`: [n_tokens, hidden_size]."""
        return self.encode_batch([image], mode)[0]

    @torch.inference_mode()
    def encode_batch(self, images: list[Image.Image], mode: str | Mode) -> list[torch.Tensor]:
        """Vision tokens of each image at `mode`; global views (and Gundam tiles) batched."""
        mode = get_mode(mode)
        views = [make_views(image, mode) for image in images]
        return self.encode_views(views)

    @torch.inference_mode()
    def encode_views(self, views: list[Views]) -> list[torch.Tensor]:
        """Like `encode_batch` for views already prepared (e.g. by worker processes).

        On a GPU the pass runs on a CUDA stream of its own, so the decoder's steps (on the
        default stream, from other threads) run beside it instead of queueing behind it;
        the results are complete when this returns.
        """
        if not views:
            return []
        if self.device.type != "cuda":
            return self._encode_views(views)
        with torch.cuda.stream(self._stream):
            out = self._encode_views(views)
        self._stream.synchronize()
        consumer = torch.cuda.current_stream(self.device)
        for tokens in out:  # freed later after work on the consumer's stream, not before
            tokens.record_stream(consumer)
        return out

    def _encode_views(self, views: list[Views]) -> list[torch.Tensor]:
        global_features = self._features(self._batch([v.global_view for v in views]))
        tile_counts = [v.tiles.shape[0] for v in views]
        tile_features = (
            self._features(self._batch([tile for v in views for tile in v.tiles]))
            if sum(tile_counts)
            else None
        )
        out, start = [], 0
        for i, v in enumerate(views):
            tiles = None
            if tile_counts[i]:
                tiles = tile_features[start : start + tile_counts[i]]
                start += tile_counts[i]
            out.append(self.model.layout(global_features[i], tiles, v.tile_grid))
        return out

    def _batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 [3, S, S] images stacked, on a GPU into pinned memory (an asynchronous copy)."""
        if self.device.type != "cuda":
            return torch.stack(images)
        out = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=True)
        return torch.stack(images, out=out)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: uint8 [B, 3, S, S] -> features [B, (S/64)^2, hidden]
        pixels = pixels.to(self.device, non_blocking=True)
        if self._graphs is None:
            return self.model(normalize(pixels, self.dtype))
        n = pixels.shape[0]
        key = (graph_batch(n), *pixels.shape[1:])
        with self._graph_lock:
            if key not in self._graphs:
                self._graphs[key] = self._capture(pixels.new_zeros(key))
                if len(self._graphs) > MAX_CUDA_GRAPHS:
                    del self._graphs[next(iter(self._graphs))]
            else:
                self._graphs[key] = self._graphs.pop(key)  # most recently used last
            graph, static_in, static_out = self._graphs[key]
            static_in[:n].copy_(pixels)  # padding rows keep old pixels; their rows are dropped
            graph.replay()
            return static_out[:n].clone()  # the next replay of any graph may overwrite it

    def _capture(self, static_in: torch.Tensor) -> tuple:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: library plans and workspaces
            self.model(normalize(static_in, self.dtype))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the decode scheduler) keep working during the capture
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            static_out = self.model(normalize(static_in, self.dtype))
        return graph, static_in, static_out
