"""Continuous-batched decoding: many requests share every decoder step.

A `Scheduler` owns a paged KV cache (`paged.PagedKVCache`) and one thread that
loops: it admits waiting requests (each reserves the blocks its prompt and
answer budget need, then is prefilled straight into them; its first token
comes from that prefill), then runs one decode step for every running request
at once, whatever their lengths: each row has its own position, its own
blocks and its own length, and attends over its own keys only. Requests join
and leave between steps. On the GPU (bf16) each step is replayed from a CUDA
graph captured once per batch-size bucket (1, 2, 4, ... `max_batch`); rows of
a bucket that hold no request point at a scratch block.

    scheduler = model.scheduler()               # or Scheduler(decoder, eos_id)
    handle = scheduler.submit(inputs, GenerationConfig(max_new_tokens=128))
    for token in handle: ...                    # streamed as each step finishes
    handle.cancel()                             # the request leaves at the next step

A request's tokens are chosen exactly as `generation.generate_ids` chooses them
(the same logits processors, argmax or seeded sampling), so greedy ids equal a
run alone wherever the logits do; they differ from the single-request path only
by the attention kernel's rounding (float32: identical ids in the tests; bf16:
teacher-forced logits within the equivalence harness's tolerance, checked by
`benchmarks/decoder_gpu.py`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import apply_rotary_pos_emb

from optical_memory.backends.deepseek_ocr.context import DecoderInputs
from optical_memory.backends.deepseek_ocr.experts import uses_grouped_kernel
from optical_memory.backends.deepseek_ocr.generation import GenerationConfig
from optical_memory.backends.deepseek_ocr.paged import (
    OutOfBlocks,
    PagedKVCache,
    decode_splits,
    paged_decode_attention,
)

_DONE = object()


class RequestCancelled(RuntimeError):
    """The request was cancelled before it finished."""


@dataclass(eq=False)
class Request:
    """One generation: its inputs, options and progress (owned by the scheduler's thread)."""

    inputs: DecoderInputs
    config: GenerationConfig
    forced_ids: list[int] | None = None  # teacher forcing (checks): feed these ids instead
    record_logits: bool = False
    id: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    generated: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # positions in the cache
    next_token: int | None = None  # chosen, not yet in the cache
    error: BaseException | None = None
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.processors = self.config.processors()
        self.ids = self.inputs.input_ids  # grows with each token (for the n-gram rule)
        self.generator = None
        if self.config.do_sample and self.config.seed is not None:
            device = self.inputs.inputs_embeds.device
            self.generator = torch.Generator(device=device).manual_seed(self.config.seed)

    @property
    def prompt_length(self) -> int:
        return self.inputs.length

    @property
    def plain_greedy(self) -> bool:
        return not self.config.do_sample and not self.processors and self.forced_ids is None


class RequestHandle:
    """A submitted request: iterate for its tokens as they come, `result()` for all of them,
    `cancel()` to stop it (its cache is freed at the next step)."""

    def __init__(self, request: Request, scheduler: Scheduler) -> None:
        self._request = request
        self._scheduler = scheduler
        self._consumed = False

    @property
    def request(self) -> Request:
        return self._request

    def __iter__(self) -> Iterator[int]:
        if self._consumed:
            raise RuntimeError("a request's tokens can be iterated once")
        self._consumed = True
        try:
            while True:
                item = self._request._events.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if self._request.finished is None:  # the consumer went away: stop the request
                self.cancel()

    def result(self) -> list[int]:
        return list(self)

    def cancel(self) -> None:
        self._request._cancel.set()
        self._scheduler._wake()

    @property
    def cancelled(self) -> bool:
        return self._request._cancel.is_set()


class _Bucket:
    """Static inputs and outputs of a decode step of `size` rows (and its CUDA graph)."""

    def __init__(self, size: int, max_blocks: int, device: torch.device) -> None:
        self.size = size
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slots = torch.zeros(size, dtype=torch.long, device=device)
        self.block_table = torch.zeros(size, max_blocks, dtype=torch.int32, device=device)
        self.lengths = torch.ones(size, dtype=torch.int32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class Scheduler:
    """Continuous batching over one decoder (see the module docstring).

    `max_batch`: most requests decoded at once (more wait). `kv_cache_tokens`: positions the
    paged cache holds in all (default: on CUDA, `kv_cache_fraction` of the free GPU memory,
    at most `max_batch` windows; elsewhere `max_batch` windows). `block_size`: positions per
    cache block. `cuda_graphs`: replay steps from CUDA graphs (default: where the whole step
    can be captured, i.e. CUDA in bf16). `prefill_tokens_per_step`: prompt positions prefilled
    between two decode steps (at least one prompt), so running requests keep streaming.
    `compile_step`: run the step through `torch.compile` (fusion; slow first use per bucket).
    """

    def __init__(
        self,
        decoder: torch.nn.Module,  # DeepseekOCRDecoder
        eos_id: int,
        *,
        max_batch: int = 64,
        kv_cache_tokens: int | None = None,
        kv_cache_fraction: float = 0.5,
        block_size: int = 64,
        cuda_graphs: bool | None = None,
        prefill_tokens_per_step: int = 16384,
        compile_step: bool = False,
    ) -> None:
        cfg = decoder.config
        if cfg.num_key_value_heads != cfg.num_attention_heads:
            raise NotImplementedError("the paged cache assumes plain multi-head attention")
        self.decoder = decoder
        self.eos_id = eos_id
        self.max_batch = max_batch
        self.window = cfg.max_position_embeddings
        self.block_size = block_size
        self.max_blocks = math.ceil(self.window / block_size)
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.device, self.dtype = decoder.device, decoder.dtype
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        layers = cfg.num_hidden_layers
        per_block = PagedKVCache.bytes_per_block(
            layers, self.heads, self.head_dim, block_size, self.dtype
        )
        if kv_cache_tokens is None:
            kv_cache_tokens = max_batch * self.window
            if self.device.type == "cuda":
                free = torch.cuda.mem_get_info(self.device)[0]
                kv_cache_tokens = min(
                    kv_cache_tokens, int(free * kv_cache_fraction) // per_block * block_size
                )
        blocks = max(2, math.ceil(kv_cache_tokens / block_size) + 1)
        self.cache = PagedKVCache(
            layers,
            self.heads,
            self.head_dim,
            blocks,
            block_size,
            device=self.device,
            dtype=self.dtype,
        )
        self.kv_cache_bytes = blocks * per_block
        if cuda_graphs is None:
            cuda_graphs = uses_grouped_kernel(self.device, self.dtype)
        self.cuda_graphs = cuda_graphs
        sizes = [1 << i for i in range(max(1, max_batch).bit_length())]
        if sizes[-1] < max_batch:
            sizes.append(max_batch)
        self.bucket_sizes = [s for s in sizes if s <= max_batch] or [max_batch]
        if self.bucket_sizes[-1] != max_batch:
            self.bucket_sizes.append(max_batch)
        self._buckets: dict[int, _Bucket] = {}
        # torch.compile fuses the step's elementwise work (norms, RoPE, routing, SwiGLU); each
        # bucket size compiles once, then is captured like the plain step
        self._step_fn = torch.compile(self._step, dynamic=False) if compile_step else self._step
        self._sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count
            if self.device.type == "cuda"
            else 1
        )
        self._inbox: deque[Request] = deque()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode steps run
        self.step_rows = 0  # sequences they advanced
        self.decode_seconds = 0.0  # wall time in decode steps (launch to logits on the host)
        self.prefill_seconds = 0.0

    # ------------------------------------------------------------------ public
    def submit(
        self,
        inputs: DecoderInputs,
        config: GenerationConfig,
        *,
        forced_ids: list[int] | None = None,
        record_logits: bool = False,
    ) -> RequestHandle:
        """Queue a request (inputs of one sequence); tokens stream through the handle."""
        if inputs.input_ids.shape[0] != 1:
            raise ValueError("submit one sequence per request")
        total = inputs.length + config.max_new_tokens
        if total > self.window:
            raise ValueError(f"{total} positions do not fit the {self.window}-position window")
        if self.cache.blocks_for(total) > self.cache.blocks - 1:
            raise ValueError(f"{total} positions exceed the whole KV cache")
        request = Request(inputs, config, forced_ids, record_logits, id=next(self._ids))
        with self._lock:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            self._inbox.append(request)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="optical-memory-scheduler", daemon=True
                )
                self._thread.start()
            self._lock.notify()
        return RequestHandle(request, self)

    def generate_ids(self, inputs: DecoderInputs, config: GenerationConfig) -> list[int]:
        return self.submit(inputs, config).result()

    def warmup(self) -> None:
        """Capture every bucket's CUDA graph now rather than on first use (before any submit)."""
        if self._thread is not None:
            raise RuntimeError("warmup() must come before the first submit()")
        if self.cuda_graphs:
            with torch.inference_mode():
                for size in self.bucket_sizes:
                    self._bucket(size)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._running) + len(self._waiting) + len(self._inbox)

    # ------------------------------------------------------------------ loop
    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._waiting or self._running or self._closed):
                    self._lock.wait()
                if self._closed:
                    pending = [*self._inbox, *self._waiting, *self._running]
                    self._inbox.clear()
                    self._waiting.clear()
                    self._running.clear()
                else:
                    pending = None
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
            if pending is not None:
                for r in pending:
                    self._finish(r, RuntimeError("scheduler closed"))
                return
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as exc:  # noqa: BLE001 - delivered to every request in flight
                for r in [*self._running, *self._waiting]:
                    self._finish(r, exc)
                self._running.clear()
                self._waiting.clear()

    def _iteration(self) -> None:
        for r in [r for r in self._waiting if r._cancel.is_set()]:
            self._waiting.remove(r)
            self._finish(r, RequestCancelled("cancelled"))
        for r in [r for r in self._running if r._cancel.is_set()]:
            self._running.remove(r)
            self._finish(r, RequestCancelled("cancelled"))
        budget = self.prefill_tokens_per_step
        prefilled = 0
        while self._waiting and len(self._running) < self.max_batch:
            r = self._waiting[0]
            if prefilled and r.prompt_length > budget:
                break
            try:
                r.blocks = self.cache.allocate(r.prompt_length + r.config.max_new_tokens)
            except OutOfBlocks:
                if not self._running:
                    raise
                break  # waits for running requests to free blocks
            self._waiting.popleft()
            budget -= r.prompt_length
            prefilled += 1
            start = time.perf_counter()
            logits = self._prefill(r)
            keep = self._choose(r, logits)
            self.prefill_seconds += time.perf_counter() - start
            if keep:
                self._running.append(r)
        if self._running:
            self._decode(self._running)
            self._running = [r for r in self._running if r.finished is None]

    def _finish(self, r: Request, error: BaseException | None = None) -> None:
        if r.finished is not None:
            return
        r.finished = time.perf_counter()
        if r.blocks:
            self.cache.release(r.blocks)
            r.blocks = []
        r.error = error
        r._events.put(error if error is not None else _DONE)

    def _choose(self, r: Request, logits: torch.Tensor, token: int | None = None) -> bool:
        """Pick `r`'s next token from its logits [1, vocab] (or take `token`, the batched
        argmax); emit it; False when the request is done."""
        if r.record_logits:
            r.logits.append(logits.float().cpu())
        i = len(r.generated)
        if r.forced_ids is not None:
            token = r.forced_ids[i]
        elif token is None:
            scores = r.processors(r.ids, logits)
            if r.config.do_sample:
                probs = torch.softmax(scores, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=r.generator))
            else:
                token = int(scores.argmax(dim=-1))
        r.generated.append(token)
        if r.first_token is None:
            r.first_token = time.perf_counter()
        r._events.put(token)
        last = i == r.config.max_new_tokens - 1
        if r.forced_ids is not None:
            last = last or i == len(r.forced_ids) - 1
        if token == self.eos_id or last:
            self._finish(r)
            return False
        if r.processors:
            r.ids = torch.cat([r.ids, torch.tensor([[token]], device=r.ids.device)], dim=1)
        r.next_token = token
        return True

    # ------------------------------------------------------------------ model
    def _layers(self):
        return self.decoder.model.layers[: self.decoder.config.num_hidden_layers]

    def _prefill(self, r: Request) -> torch.Tensor:
        """Run `r`'s prompt, writing its keys and values into its blocks; logits [1, vocab]."""
        n = r.prompt_length
        slots = self.cache.slots(r.blocks, 0, n).to(self.device)
        h = r.inputs.inputs_embeds.to(self.dtype)
        positions = r.inputs.position_ids
        cos, sin = self.decoder.model.rotary_emb(h, positions)
        for li, layer in enumerate(self._layers()):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, n, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, n, self.heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, n, self.heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.cache.write(li, slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            with self._prefill_attention():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, n, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.decoder.model.norm(h[:, -1:])
        r.cached = n
        return self.decoder._lm_head(h)[:, -1]

    def _prefill_attention(self):
        # cuDNN's attention builds an execution plan for every new sequence length (measured
        # by benchmarks/decoder_gpu.py: about 100 ms the first time a length is seen), and
        # every prompt has its own length: flash attention has no per-length cost.
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])

    def _step(self, b: _Bucket) -> torch.Tensor:
        """One token for each row of bucket `b` -> logits [rows, vocab] (float32)."""
        rows = b.size
        h = self.decoder.embed_tokens(b.tokens)[:, None]  # [rows, 1, hidden]
        cos, sin = self.decoder.model.rotary_emb(h, b.positions[:, None])
        splits = decode_splits(rows, self.heads, self.max_blocks, self._sms)
        for li, layer in enumerate(self._layers()):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(rows, 1, self.heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.cache.write(li, b.slots, k[:, :, 0], v[:, 0])
            o = paged_decode_attention(
                q[:, :, 0],
                self.cache.keys[li],
                self.cache.values[li],
                b.block_table,
                b.lengths,
                self.block_size,
                attn.scaling,
                splits,
            )  # [rows, heads, head_dim]
            h = h + attn.o_proj(o.reshape(rows, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.decoder.model.norm(h)
        return self.decoder._lm_head(h)[:, -1]

    def _bucket(self, rows: int) -> _Bucket:
        size = next(s for s in self.bucket_sizes if s >= rows)
        b = self._buckets.get(size)
        if b is None:
            b = self._buckets[size] = _Bucket(size, self.max_blocks, self.device)
            if self.cuda_graphs:
                self._capture(b)
        return b

    def _capture(self, b: _Bucket) -> None:
        # rows point at the scratch block (all zeros): a harmless step to warm up and capture
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step_fn(b)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            b.logits = self._step_fn(b)
        b.graph = graph

    def _decode(self, running: list[Request]) -> None:
        start = time.perf_counter()
        n = len(running)
        b = self._bucket(n)
        tokens = torch.zeros(b.size, dtype=torch.long)
        positions = torch.zeros(b.size, dtype=torch.long)
        slots = torch.zeros(b.size, dtype=torch.long)
        lengths = torch.ones(b.size, dtype=torch.int32)
        table = torch.zeros(b.size, self.max_blocks, dtype=torch.int32)
        bs = self.block_size
        for i, r in enumerate(running):
            pos = r.cached
            tokens[i] = r.next_token
            positions[i] = pos
            slots[i] = r.blocks[pos // bs] * bs + pos % bs
            lengths[i] = pos + 1
            table[i, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
        nb = self.device.type == "cuda"
        b.tokens.copy_(tokens, non_blocking=nb)
        b.positions.copy_(positions, non_blocking=nb)
        b.slots.copy_(slots, non_blocking=nb)
        b.lengths.copy_(lengths, non_blocking=nb)
        b.block_table.copy_(table, non_blocking=nb)
        if b.graph is not None:
            b.graph.replay()
            logits = b.logits
        else:
            logits = self._step_fn(b)
        self.steps += 1
        self.step_rows += n
        greedy = [r.plain_greedy for r in running]
        argmax = logits[:n].argmax(dim=-1).tolist() if any(greedy) else None
        self.decode_seconds += time.perf_counter() - start
        for i, r in enumerate(running):
            r.cached += 1
            row = logits[i : i + 1]
            if greedy[i]:
                self._choose(r, row, argmax[i])
            else:
                self._choose(r, row.clone())
