"""Page images -> encoder views in worker processes, so the GPU's process never waits for PIL.

Decoding a cached page PNG and resizing it to a mode's views takes 20-40 ms of
CPU per page. Pillow releases the interpreter lock while it works, but done in
the threads of the process that drives the GPU, dozens of callers' Python glue
still contends for that lock with the encoder's and the decode scheduler's
kernel launches, which then stall. A `ViewPool` does the whole job in spawned
processes: each gets the page's cache entry as it is stored (a PNG of a few
hundred KB, checked there as hostile input, see `optical_memory.cache`) and
sends the uint8 views back as arrays through the pipe, so the driving process
only waits on futures.

    pool = ViewPool(4)
    views = pool.submit(key, entry, (width, height), "base").result()
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import torch

from optical_memory.backends.deepseek_ocr.preprocess import Views, make_views
from optical_memory.cache import image_from_bytes


def default_view_processes(device: torch.device | str) -> int:
    """Processes for views by default: on a GPU, half the cores up to 8 (the rest drive the
    GPU and serve); on the CPU none (views are made in the calling thread: processes would
    take the cores the encoder runs on)."""
    if torch.device(device).type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def views_from_entry(key: str, entry: bytes, size: tuple[int, int], mode: str) -> Views:
    """The views of a cached page image entry (raises CacheEntryError when it is unsound)."""
    return make_views(image_from_bytes(key, entry, size=size, gray=True), mode)


def _view_arrays(
    key: str, entry: bytes, size: tuple[int, int], mode: str
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """In a view process: the views as arrays. An array pickles as one copy through the pipe,
    where torch's tensor pickling makes a shared-memory segment per tensor and hands over its
    descriptor on a connection of its own, about half as fast for these sizes."""
    views = views_from_entry(key, entry, size, mode)
    return views.global_view.numpy(), views.tiles.numpy(), views.tile_grid


def _init_worker() -> None:
    torch.set_num_threads(1)  # one page per process at a time; Pillow is single-threaded


class ViewPool:
    """Makes views from cached page image entries in `processes` spawned processes (started
    on the first `submit`; `close` stops them), or with 0 in the calling thread (`submit`
    returns a finished future). Safe to share between threads."""

    def __init__(self, processes: int = 0):
        if processes < 0:
            raise ValueError(f"view processes must be 0 or more, got {processes}")
        self.processes = processes
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.processes,
                    mp_context=multiprocessing.get_context("spawn"),  # a CUDA parent: no fork
                    initializer=_init_worker,
                )
            return self._executor

    def submit(self, key: str, entry: bytes, size: tuple[int, int], mode: str) -> Future:
        """A future of the `Views` of one cached page image entry at `mode` (its exception:
        CacheEntryError when the entry is unsound)."""
        future: Future = Future()
        if not self.processes:
            try:
                future.set_result(views_from_entry(key, entry, size, mode))
            except Exception as exc:  # noqa: BLE001 (the caller's, through the future)
                future.set_exception(exc)
            return future

        def done(arrays: Future) -> None:
            try:
                global_view, tiles, grid = arrays.result()
                future.set_result(Views(torch.from_numpy(global_view), torch.from_numpy(tiles), grid))
            except BaseException as exc:  # noqa: BLE001 (the caller's, through the future)
                future.set_exception(exc)

        self._pool().submit(_view_arrays, key, entry, size, mode).add_done_callback(done)
        return future

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
