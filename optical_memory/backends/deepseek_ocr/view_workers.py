"""Page views made in worker processes, so that encoding never waits on one interpreter's PIL.

Decoding a cached page PNG and resizing, padding and tiling it into a mode's views is
CPU work that holds the GIL for most of its time: threads that prepare pages for the
encoder queue up behind one another. `ViewWorkers` hands each page to a process pool
instead: the cache entry's bytes go in (checked there as hostile, exactly as
`optical_memory.cache.image_from_bytes` checks them), uint8 views come back. A page
whose image is not cached, or whose entry fails the checks, is made in the caller's
thread the usual way (`memory.page_image`, which renders it and drops a bad entry).
The views are the same bytes either way.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from optical_memory.backends.deepseek_ocr.preprocess import Views, make_views
from optical_memory.cache import IMAGE_MODE, cache_key, image_from_bytes
from optical_memory.pages import PageRecord


def views_of_entry(key: str, value: bytes, size: tuple[int, int], mode: str) -> Views:
    """In a worker process: the views of a cached page image entry."""
    return make_views(image_from_bytes(key, value, size=size), mode)


class ViewWorkers:
    """A pool of `processes` worker processes (spawned) making page views."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"view worker processes must be at least 1, got {processes}")
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn")
                )
            return self._pool

    def views(
        self, memory: Any, session_id: str, pages: Sequence[tuple[PageRecord, str]]
    ) -> list[Views]:
        """The views of `pages` ((record, mode) pairs) of a session of `memory`, in order."""
        keys = [cache_key(r.content_hash, r.fingerprint, IMAGE_MODE, "") for r, _ in pages]
        found = memory.store.cache_get_many(session_id, keys)
        pool = self._executor() if found else None
        futures: list[Future[Views] | None] = [
            pool.submit(views_of_entry, key, found[key], (r.width, r.height), mode)
            if pool is not None and key in found else None
            for key, (r, mode) in zip(keys, pages)
        ]
        out = []
        for future, (record, mode) in zip(futures, pages):
            try:
                views = future.result() if future is not None else None
            except Exception:  # noqa: BLE001 (a hostile entry: made again below, and dropped)
                views = None
            if views is None:
                views = make_views(memory.page_image(session_id, record), mode)
            out.append(views)
        return out

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None
