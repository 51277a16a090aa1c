"""The local DeepSeek-OCR backend: our DeepEncoder, decoder and vision-token cache.

The reference backend. Pages are encoded at their tier (the DeepEncoder mode of
the same name) and their embeddings cached in the store, keyed by the page's
content, the render configuration, the mode and the encoder's weights; the
decoder reads [page embeddings, oldest first] + "\\n" + recent text + query, as
the reference prompt format does. Window, tiers and token counting come from
the checkpoint's config.json and tokenizer.json, so planning needs no torch;
the model itself is loaded on first use.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, as_completed
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from optical_memory.backends.base import Answer, AnswerStream, Backend
from optical_memory.backends.deepseek_ocr.configuration import DecoderConfig
from optical_memory.backends.profiles import Profile, deepseek_ocr_profile
from optical_memory.cache import CacheEntryError, cache_key, page_image_key
from optical_memory.encode_queue import (
    EncodeError,
    EncodeTimeoutError,
    LocalEncodeQueue,
    PageJob,
    RedisEncodeQueue,
    describe_pages,
)
from optical_memory.modes import get_mode
from optical_memory.plan import PagePlan, Plan
from optical_memory.prompt import PageSource, Prompt, format_query
from optical_memory.tokens import TokenCounter

if TYPE_CHECKING:
    import torch

    from optical_memory.backends.deepseek_ocr.model import OpticalModel
    from optical_memory.backends.deepseek_ocr.preprocess import Views
    from optical_memory.backends.deepseek_ocr.view_pool import ViewPool
    from optical_memory.pages import PageRecord

log = logging.getLogger(__name__)

ENCODINGS = ("local", "workers", "inline")
ENCODING_ENV = "OPTICAL_MEMORY_ENCODING"  # the default of `encoding` (e.g. for the CLI and serve)


@dataclass(frozen=True)
class Context:
    """Decoder inputs for a plan: `segments` (page embeddings, oldest first, then text)."""

    plan: Plan
    segments: list[Any]
    encoded: int  # pages encoded for this call (the rest came from the cache)


class DeepSeekOCRBackend(Backend):
    """DeepSeek-OCR from a local checkpoint directory (or an already loaded `OpticalModel`).

    `device` and `dtype` default to CUDA in bf16 when available, else CPU in float32.
    `batching`: answers from all threads share the model's continuous-batching `Scheduler`
    (default: on for CUDA); `scheduler` holds its options (max_batch, kv_cache_tokens, ...).

    Pages missing from the vision-token cache are encoded by `encoding` (default:
    $OPTICAL_MEMORY_ENCODING, else "local"):
    - "local" (default): one queue and one encoding thread per backend, shared by every
      session and thread using it: up to `encode_batch` pages of one tier per forward pass,
      taken from all concurrent `context()` / `ask()` calls (see `LocalEncodeQueue`);
    - "workers": queued in the Redis store's encode stream and encoded by
      `optical-memory worker` processes on any machines (see `RedisEncodeQueue`; the store
      must be a Redis store, plain or cluster, and the workers must load the same weights in
      the same dtype); this process renders the pages and reads their vision tokens from the
      cache;
    - "inline": in the calling thread, batches of one call's pages only.
    A call waits at most `encode_timeout_s` for its pages (`EncodeTimeoutError`, naming them).
    With "local", `view_processes` processes decode the cached page images and make their
    encoder views (see `ViewPool`; default: half the cores up to 8 when the encoder is on a
    GPU, 0 on the CPU; 0: in the calling thread).
    `encode_queue_depth` tells how many pages are waiting or being encoded.
    """

    name = "deepseek-ocr"

    def __init__(
        self,
        checkpoint: str | os.PathLike | OpticalModel,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batching: bool | None = None,
        scheduler: dict[str, Any] | None = None,
        encoding: str | None = None,
        encode_batch: int = 8,
        encode_timeout_s: float = 300.0,
        view_processes: int | None = None,
    ) -> None:
        if encoding is None:
            encoding = os.environ.get(ENCODING_ENV) or "local"
        if encoding not in ENCODINGS:
            raise ValueError(
                f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r} "
                f"(from ${ENCODING_ENV} unless given)"
            )
        if encode_batch < 1:
            raise ValueError(f"encode_batch must be at least 1, got {encode_batch}")
        if encode_timeout_s <= 0:
            raise ValueError(f"encode_timeout_s must be positive, got {encode_timeout_s}")
        self.encoding = encoding
        self.encode_batch = encode_batch
        self.encode_timeout_s = encode_timeout_s
        if view_processes is not None and view_processes < 0:
            raise ValueError(f"view_processes must be 0 or more, got {view_processes}")
        self._view_processes = view_processes
        self._view_pool: ViewPool | None = None
        self._queue_lock = threading.Lock()
        self._local_queue: LocalEncodeQueue | None = None
        self._redis_queues: dict[int, RedisEncodeQueue] = {}  # by id of the store
        self._batching, self._scheduler_options = batching, dict(scheduler or {})
        self._model: OpticalModel | None = None
        self.path: Path | None = None
        if isinstance(checkpoint, (str, os.PathLike)):
            self.path = Path(checkpoint)
            if not self.path.is_dir():
                raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        else:
            self._model = checkpoint
        self._device, self._dtype = device, dtype

    @classmethod
    def from_spec(cls, argument: str | None, **options: Any) -> DeepSeekOCRBackend:
        if not argument:
            raise ValueError("backend 'deepseek-ocr' needs a checkpoint directory: deepseek-ocr:DIR")
        return cls(argument, **options)

    @property
    def description(self) -> str:
        return f"deepseek-ocr backend ({self.path or 'loaded model'})"

    @property
    def model(self) -> OpticalModel:
        """The model, loaded on first use."""
        if self._model is None:
            from optical_memory.backends.deepseek_ocr.model import load_model

            self._model = load_model(self.path, device=self._device, dtype=self._dtype)
        return self._model

    @cached_property
    def _decoder_config(self) -> DecoderConfig:
        if self._model is not None:
            return self._model.decoder.config
        from optical_memory.backends.deepseek_ocr.weights import read_config

        return DecoderConfig.from_checkpoint_config(read_config(self.path))

    @cached_property
    def profile(self) -> Profile:
        return deepseek_ocr_profile(self._decoder_config.max_position_embeddings)

    @cached_property
    def counter(self) -> TokenCounter:
        """The checkpoint's own tokenizer (no torch needed to read it)."""
        if self._model is not None:
            return self._model.token_counter
        from optical_memory.backends.deepseek_ocr.tokenizer import OCRTokenizer

        config = self._decoder_config
        return OCRTokenizer.from_dir(
            self.path, bos_id=config.bos_token_id, eos_id=config.eos_token_id
        )

    # --- vision tokens ----------------------------------------------------------------
    @property
    def encode_queue(self) -> LocalEncodeQueue:
        """The in-process encode queue (created on first use; encoding="local")."""
        with self._queue_lock:
            if self._local_queue is None:
                encoder = self.model.encoder
                self._local_queue = LocalEncodeQueue(
                    lambda mode, views: encoder.encode_views(views), batch=self.encode_batch
                )
            return self._local_queue

    @property
    def view_pool(self) -> ViewPool:
        """What makes the encoder views of the "local" queue's pages (see `view_processes`)."""
        with self._queue_lock:
            if self._view_pool is None:
                from optical_memory.backends.deepseek_ocr.view_pool import (
                    ViewPool,
                    default_view_processes,
                )

                n = self._view_processes
                if n is None:
                    n = default_view_processes(self.model.encoder.device)
                self._view_pool = ViewPool(n)
            return self._view_pool

    def close(self) -> None:
        """Stop the view processes (a later encode starts them again)."""
        with self._queue_lock:
            pool, self._view_pool = self._view_pool, None
        if pool is not None:
            pool.close()

    @property
    def encode_queue_depth(self) -> int:
        """Pages waiting to be encoded or being encoded now: the in-process queue's, or with
        encoding="workers" the Redis encode stream's (every process's pages; 0 before this
        backend's first use of it)."""
        if self.encoding == "workers":
            return sum(queue.depth for queue in list(self._redis_queues.values()))
        queue = self._local_queue
        return queue.depth if queue is not None else 0

    def _redis_queue(self, store: Any, encoder_id: str) -> RedisEncodeQueue:
        from optical_memory.stores.redis import RedisStore

        if not isinstance(store, RedisStore):
            raise ValueError(  # noqa: TRY004 (a configuration error, not a wrong argument type)
                'encoding="workers" shares pages through a Redis store (redis:// or '
                f'redis+cluster://), not {type(store).__name__}; use encoding="local" here'
            )
        with self._queue_lock:
            queue = self._redis_queues.get(id(store))
            if queue is None or queue.store is not store:
                queue = RedisEncodeQueue(store, encoder_id, timeout_s=self.encode_timeout_s)
                self._redis_queues[id(store)] = queue
            return queue

    def encode_pages(
        self,
        memory: PageSource,
        session_id: str,
        plan: Plan,
        progress: bool = False,
        batch_size: int = 8,
    ) -> tuple[list[torch.Tensor], int]:
        """Vision tokens of the plan's pages in context, oldest first; encodes only cache misses.

        Misses go to the backend's `encoding` (see the class). `batch_size`: with "inline" the
        most pages per forward pass; with "local" the most pages this call has in the queue
        at once (the queue's passes take up to `encode_batch` pages of every caller).
        """
        encoder = self.model.encoder
        dtype = str(encoder.dtype).removeprefix("torch.")
        records = {r.index: r for r in memory.pages(session_id)}
        wanted = plan.in_context()
        out: dict[int, torch.Tensor] = {}
        misses: dict[str, list[tuple[PagePlan, str]]] = {}
        shapes: dict[int, tuple[int, int]] = {}
        keys: dict[int, str] = {}
        for p in wanted:
            record = records.get(p.index)
            if record is None or record.content_hash != p.content_hash:
                raise LookupError(
                    f"page {p.index} of session {session_id!r} changed since the plan; plan again"
                )
            # What the key implies: this page's vision tokens at this mode (the plan's cost is
            # the tier's), the encoder's width and dtype; any other entry is dropped, a miss.
            keys[p.index] = cache_key(p.content_hash, record.fingerprint, p.mode, encoder.cache_id)
            tokens = get_mode(p.mode).vision_tokens(record.width, record.height)
            shapes[p.index] = (tokens, encoder.hidden_size)
        hits = memory.cache.get_tensors(  # one read for all
            session_id, {keys[p.index]: shapes[p.index] for p in wanted}, dtypes=(dtype,)
        )
        for p in wanted:
            if keys[p.index] in hits:
                out[p.index] = hits[keys[p.index]]
            else:
                misses.setdefault(p.mode, []).append((p, keys[p.index]))
        encoded = sum(len(group) for group in misses.values())
        memory.store.count_cache(session_id, hits=len(out), misses=encoded)
        with tqdm(total=encoded, desc="encoding pages", unit="page", disable=not progress) as bar:
            if encoded and self.encoding != "inline":
                queued = sorted(
                    (item for group in misses.values() for item in group),
                    key=lambda item: item[0].index,
                )
                if self.encoding == "local":
                    encoded_now = self._encode_local(
                        memory, session_id, records, queued, shapes, batch_size
                    )
                else:
                    encoded_now = self._encode_workers(
                        memory, session_id, records, queued, shapes, dtype
                    )
                for p, embedding in encoded_now:
                    out[p.index] = embedding
                    bar.update(1)
                misses = {}
            for mode, group in misses.items():
                for start in range(0, len(group), batch_size):
                    chunk = group[start : start + batch_size]
                    images = [memory.page_image(session_id, records[p.index]) for p, _ in chunk]
                    embeddings = encoder.encode_batch(images, mode)
                    _put_embeddings(
                        memory, session_id, shapes,
                        [(p.index, key, e) for (p, key), e in zip(chunk, embeddings)],
                    )
                    out.update((p.index, e) for (p, _), e in zip(chunk, embeddings))
                    bar.update(len(chunk))
        return [out[p.index] for p in wanted], encoded

    def _encode_local(
        self,
        memory: PageSource,
        session_id: str,
        records: dict[int, PageRecord],
        queued: list[tuple[PagePlan, str]],
        shapes: dict[int, tuple[int, int]],
        batch_size: int,
    ) -> Iterator[tuple[PagePlan, torch.Tensor]]:
        """Through the in-process queue. Views are made by the view pool's processes when it
        has any (every page of the call at once, each queued as soon as its views are ready),
        else in the caller's thread, `batch_size` pages at a time."""
        queue = self.encode_queue

        def store(jobs: list[PageJob], embeddings: list[torch.Tensor]) -> None:  # encoding thread
            _put_embeddings(
                memory, session_id, shapes,
                [(job.index, job.key, e) for job, e in zip(jobs, embeddings)],
            )

        deadline = time.monotonic() + self.encode_timeout_s
        jobs = [PageJob(session_id, key, p.index, p.mode) for p, key in queued]
        step = len(jobs) if self.view_pool.processes else max(1, batch_size)
        for start in range(0, len(jobs), step):
            chunk = jobs[start : start + step]
            futures: list[Future | None] = [None] * len(chunk)
            try:
                for n, views in self._page_views(memory, session_id, records, chunk, deadline):
                    futures[n] = queue.submit(chunk[n], views, store)[0]
                for n, future in enumerate(futures):
                    embedding = future.result(timeout=max(0.0, deadline - time.monotonic()))
                    yield queued[start + n][0], embedding
            except TimeoutError:
                late = [j for j, f in zip(chunk, futures) if f is None or not f.done()]
                late += jobs[start + step :]
                raise EncodeTimeoutError(
                    f"{len(late)} page(s) not encoded within the {self.encode_timeout_s:g} "
                    f"s encode timeout: {describe_pages(late)}; the in-process queue holds "
                    f"{queue.depth} page(s)",
                    late,
                ) from None

    def _page_views(
        self,
        memory: PageSource,
        session_id: str,
        records: dict[int, PageRecord],
        jobs: list[PageJob],
        deadline: float,
    ) -> Iterator[tuple[int, Views]]:
        """(position in `jobs`, views) of each page, in the order they are ready: pages whose
        image is cached go to the view pool; the rest (and any whose entry turns out unsound,
        dropped) are rendered and prepared here."""
        keys = [page_image_key(records[j.index].content_hash, records[j.index].fingerprint)
                for j in jobs]
        entries = memory.cache.get_entries(session_id, keys)
        pending: dict[Future, int] = {}
        for n, (job, key) in enumerate(zip(jobs, keys)):
            if key in entries:
                record = records[job.index]
                size = (record.width, record.height)
                pending[self.view_pool.submit(key, entries[key], size, job.mode)] = n
        here = set(range(len(jobs))) - set(pending.values())
        for n in sorted(here):
            yield n, self._views_here(memory, session_id, records[jobs[n].index], jobs[n].mode)
        for future in as_completed(pending, timeout=max(0.0, deadline - time.monotonic())):
            n = pending[future]
            try:
                yield n, future.result()
            except CacheEntryError as exc:
                record = records[jobs[n].index]
                log.warning("dropping the cached image of %s: %s", jobs[n].describe(), exc)
                memory.store.cache_delete(session_id, keys[n])
                yield n, self._views_here(memory, session_id, record, jobs[n].mode)

    @staticmethod
    def _views_here(memory: PageSource, session_id: str, record: PageRecord, mode: str) -> Views:
        from optical_memory.backends.deepseek_ocr.preprocess import make_views

        return make_views(memory.page_image(session_id, record), mode)

    def _encode_workers(
        self,
        memory: PageSource,
        session_id: str,
        records: dict[int, PageRecord],
        queued: list[tuple[PagePlan, str]],
        shapes: dict[int, tuple[int, int]],
        dtype: str,
    ) -> Iterator[tuple[PagePlan, torch.Tensor]]:
        """Through the Redis encode stream: the page images put in the cache here, the vision
        tokens encoded by workers into the cache and read back."""
        store = memory.store
        queue = self._redis_queue(store, self.model.encoder.cache_id)
        jobs = []
        for p, key in queued:
            record = records[p.index]
            image_key = page_image_key(record.content_hash, record.fingerprint)
            size = (record.width, record.height)
            jobs.append(PageJob(session_id, key, p.index, p.mode, image_key, size))
        have = store.cache_contains(session_id, [job.image_key for job in jobs])
        for (p, _), job in zip(queued, jobs):
            if job.image_key not in have:
                record = records[p.index]
                image = memory.page_image(session_id, record)  # cached there when sealed
                if not record.sealed:
                    memory.cache.put_image(session_id, job.image_key, image)
        queue.encode(jobs)
        for (p, key), job in zip(queued, jobs):
            embedding = memory.cache.get_tensor(
                session_id, key, shape=shapes[p.index], dtypes=(dtype,)
            )
            if embedding is None:
                raise EncodeError(
                    f"the vision tokens of {job.describe()} were encoded by a worker but are "
                    "not readable from the cache (evicted by its size bound, or they failed "
                    "their checks and were dropped); ask again"
                )
            yield p, embedding

    def context(self, prompt: Prompt, progress: bool = False) -> Context:
        """Decoder inputs: the pinned text, page embeddings (cached or encoded now), then the
        turns recalled verbatim, the recent text and the query."""
        embeddings, encoded = self.encode_pages(
            prompt.memory, prompt.session_id, prompt.plan, progress
        )
        recalled = "\n" + prompt.recalled_text() if prompt.recalled else ""
        text = recalled + "\n" + prompt.recent_text() + format_query(prompt.query or "")
        pinned = [prompt.pinned_text() + "\n"] if prompt.pinned else []
        return Context(prompt.plan, [*pinned, *embeddings, text], encoded)

    # --- answers ------------------------------------------------------------------------
    def answer(
        self, prompt: Prompt, *, max_tokens: int, progress: bool = False, **generation: Any
    ) -> Answer:
        """Greedy unless `do_sample`; other options as `OpticalModel.generate`."""
        segments = self.context(prompt, progress).segments
        ids = list(self._tokens(segments, max_tokens, generation))
        finished = bool(ids) and ids[-1] == self.model.tokenizer.eos_id
        return Answer(
            self.model.answer_text(ids), self.name, str(self.path or "deepseek-ocr"),
            usage={"prompt_tokens": prompt.plan.total - prompt.plan.answer_tokens,
                   "completion_tokens": len(ids)},
            finish_reason="stop" if finished else "length",
        )

    def stream(
        self, prompt: Prompt, *, max_tokens: int, progress: bool = False, **generation: Any
    ) -> AnswerStream:
        segments = self.context(prompt, progress).segments
        result = AnswerStream(iter(()))

        def pieces() -> Iterator[str]:
            text = []
            tokens = self._tokens(segments, max_tokens, generation)
            try:
                for piece in self.model.text_pieces(tokens):
                    text.append(piece)
                    yield piece
            finally:  # a consumer that stops early cancels its request
                getattr(tokens, "close", lambda: None)()
            result.answer = Answer("".join(text), self.name, str(self.path or "deepseek-ocr"))

        result.pieces = pieces()
        return result

    def _tokens(self, segments: list[Any], max_tokens: int, generation: dict) -> Iterator[int]:
        """New token ids as they come: through the shared scheduler when batching, else alone.
        Closing the iterator early (a client gone) cancels the request."""
        from optical_memory.backends.deepseek_ocr.generation import GenerationConfig, generate_ids

        model = self.model
        config = GenerationConfig(max_new_tokens=max_tokens, **generation)
        inputs = model.assemble(segments, config.max_new_tokens)
        batching = self._batching
        if batching is None:
            batching = model.decoder.device.type == "cuda"
        if not batching:
            return generate_ids(model.decoder, inputs, config, model.tokenizer.eos_id)
        return iter(model.scheduler(**self._scheduler_options).submit(inputs, config))


def _put_embeddings(
    memory: PageSource,
    session_id: str,
    shapes: dict[int, tuple[int, int]],
    pages: list[tuple[int, str, torch.Tensor]],
) -> None:
    """Cache (page index, key, embedding) triples in one write; one of another shape than its
    page's would never be read back, so it is not stored."""
    memory.cache.put_tensors(
        session_id, [(key, e) for index, key, e in pages if tuple(e.shape) == shapes[index]]
    )
