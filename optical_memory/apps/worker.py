"""`optical-memory worker`: encode pages from the Redis encode stream on this machine's device.

Any number of workers, on any machines, share one stream per encoder (weights and dtype);
see `optical_memory.encode_queue` for the protocol. Each takes up to `--batch` pages of one
tier per forward pass, reads the pages' images from the cache (the process that queued them
put them there), preprocesses them, encodes them and stores the vision tokens in the cache,
where the waiting requests read them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from optical_memory.cache import CacheEntryError

log = logging.getLogger(__name__)

MODEL_ENV = "OPTICAL_MEMORY_MODEL"


def add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="encode pages queued in a Redis store's encode stream (run one per GPU)",
        description="Take pages from the Redis store's encode stream (shared by any number "
        "of workers), encode them with the DeepSeek-OCR encoder and store the vision tokens "
        "in the cache. Requests wait on the stream when the memory's backend is "
        'DeepSeekOCRBackend(..., encoding="workers").',
    )
    p.add_argument(
        "--store", help="redis://host:port/db or redis+cluster://host:port (default: "
        "$OPTICAL_MEMORY_STORE)",
    )
    p.add_argument(
        "--model", help=f"DeepSeek-OCR checkpoint directory (default: ${MODEL_ENV})"
    )
    p.add_argument("--batch", type=int, default=8, help="pages per forward pass (default 8)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument(
        "--dtype", help="bfloat16, float32, ... (default: bf16 on GPU, fp32 on CPU); the "
        "requests' backend must use the same",
    )
    p.add_argument(
        "--cuda-graphs", action="store_true",
        help="replay a CUDA graph per batch size and tier (each keeps a memory pool of its "
        "own; off by default: a worker's batches are full, where graphs gain nothing)",
    )
    p.add_argument(
        "--claim-after", type=float, default=60.0, metavar="SECONDS",
        help="take over pages another worker took and left undone this long (it died; "
        "default 60, longer than any batch takes)",
    )
    p.add_argument("--name", help="this worker's consumer name (default: host-pid-random)")
    p.add_argument(
        "--prefix", default="om", help="the store's key prefix (RedisStore(prefix=); default om)"
    )
    p.add_argument("--max-pages", type=int, help="exit after encoding this many pages")
    p.add_argument(
        "--idle-exit", type=float, metavar="SECONDS",
        help="exit when the stream stayed empty this long (default: run until stopped)",
    )
    p.add_argument(
        "--view-processes", type=int, metavar="N",
        help="processes decoding page images and making their views (default: half the "
        "cores up to 8 on a GPU, 0 on the CPU: in the worker's own thread)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every page stored")
    p.set_defaults(handler=run_worker)


class PageEncoder:
    """What a worker does with a batch of pages of one tier: `prepare(mode, jobs)` reads the
    pages' images from the cache and makes their encoder views (in `view_processes`
    processes, see `ViewPool`; 0: here); calling it runs one forward pass over what was
    prepared (prepared now when not given) and returns each page's packed cache value or why
    there is none."""

    def __init__(self, store: Any, encoder: Any, view_processes: int = 0) -> None:
        from optical_memory.backends.deepseek_ocr.view_pool import ViewPool

        self.store = store
        self.encoder = encoder
        self.pool = ViewPool(view_processes)

    def prepare(self, mode: str, jobs: list[Any]) -> list[Any]:
        """Each job's views, or None where its image is not in the cache or is unsound."""
        entries: dict[tuple[str, str], bytes] = {}
        for sid in {job.session_id for job in jobs}:
            keys = [job.image_key for job in jobs if job.session_id == sid]
            for key, value in self.store.cache_get_many(sid, keys).items():
                entries[(sid, key)] = value
        futures = []
        for job in jobs:
            entry = entries.get((job.session_id, job.image_key))
            futures.append(
                None if entry is None else self.pool.submit(job.image_key, entry, job.size, mode)
            )
        out = []
        for job, future in zip(jobs, futures):
            try:
                out.append(None if future is None else future.result())
            except CacheEntryError as exc:
                log.warning("dropping the cached image of %s: %s", job.describe(), exc)
                self.store.cache_delete(job.session_id, job.image_key)
                out.append(None)
        return out

    def __call__(
        self, mode: str, jobs: list[Any], prepared: list[Any] | None = None
    ) -> list[tuple[bytes | None, str]]:
        from optical_memory.cache import tensor_to_bytes
        from optical_memory.modes import get_mode

        if prepared is None:
            prepared = self.prepare(mode, jobs)
        out: list[tuple[bytes | None, str]] = [(None, "")] * len(jobs)
        views, where = [], []
        for i, page_views in enumerate(prepared):
            if page_views is None:
                out[i] = (None, "its rendered image is not in the cache (evicted?): ask again")
                continue
            views.append(page_views)
            where.append(i)
        for i, tokens in zip(where, self.encoder.encode_views(views)):
            job = jobs[i]
            expected = (get_mode(mode).vision_tokens(*job.size), self.encoder.hidden_size)
            if tuple(tokens.shape) != expected:
                out[i] = (None, f"encoded to {list(tokens.shape)}, expected {list(expected)}")
            else:
                out[i] = (tensor_to_bytes(job.key, tokens), "")
        return out


def run_worker(args: argparse.Namespace) -> int:
    from optical_memory.encode_queue import EncodeWorker
    from optical_memory.modes import MODES
    from optical_memory.stores import STORE_ENV, StoreError, parse_store_url
    from optical_memory.stores.redis import RedisStore

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.batch < 1:
        raise SystemExit("optical-memory worker: --batch must be at least 1")
    model = args.model or os.environ.get(MODEL_ENV)
    if not model:
        raise SystemExit(f"optical-memory worker: give --model DIR (or set ${MODEL_ENV})")
    url = args.store or os.environ.get(STORE_ENV) or ""
    if not url:
        raise SystemExit(
            f"optical-memory worker: give --store redis://HOST:PORT/DB (or set ${STORE_ENV})"
        )
    try:
        kind, _ = parse_store_url(url)
    except ValueError as exc:
        raise SystemExit(f"optical-memory worker: {exc}") from None
    if kind != "redis":
        raise SystemExit(
            f"optical-memory worker: the encode stream lives in a Redis store; {url!r} is "
            f"not one (give --store redis://... or set ${STORE_ENV})"
        )
    store = RedisStore(url, prefix=args.prefix)
    from optical_memory.backends.deepseek_ocr.model import load_encoder
    from optical_memory.backends.deepseek_ocr.view_pool import default_view_processes

    try:
        encoder = load_encoder(
            model, device=args.device, dtype=args.dtype, cuda_graphs=args.cuda_graphs
        )
    except (ValueError, OSError, RuntimeError) as exc:  # a bad checkpoint, device or dtype
        raise SystemExit(f"optical-memory worker: {model}: {exc}") from None
    try:
        view_processes = args.view_processes
        if view_processes is None:
            view_processes = default_view_processes(encoder.device)
        pages = PageEncoder(store, encoder, view_processes=max(0, view_processes))
        worker = EncodeWorker(
            store,
            encoder.cache_id,
            pages,
            prepare=pages.prepare,  # the next batch is read and preprocessed during this one's
            modes=MODES,
            batch=args.batch,
            claim_after_s=args.claim_after,
            name=args.name,
        )
    except StoreError as exc:
        raise SystemExit(f"optical-memory worker: {exc}") from None
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()  # the batch in hand is finished first

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(
        f"worker {worker.name}: encoder {encoder.cache_id} on {encoder.device}, "
        f"stream {worker.stream!r}, batch {args.batch}",
        file=sys.stderr, flush=True,
    )
    stats = worker.run(stop, max_pages=args.max_pages, idle_exit_s=args.idle_exit)
    print(
        f"worker {worker.name}: {stats.pages} pages encoded in {stats.batches} forward passes, "
        f"{stats.deduplicated} already cached, {stats.failed} failed; seconds preparing "
        f"{stats.prepare_s:.2f}, encoding {stats.encode_s:.2f}, storing {stats.store_s:.2f}",
        file=sys.stderr, flush=True,
    )
    store.close()
    return 0
