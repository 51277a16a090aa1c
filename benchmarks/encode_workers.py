"""Pages/s of `optical-memory worker` processes sharing one Redis encode stream: 1 worker
against N (one per GPU), in the same run.

    python benchmarks/encode_workers.py --full-size --devices 0,1 --workers 1,2 \\
        --pages 1024 --mode base --batch 32

Starts a redis-server of its own on a free port (or uses --store), writes a random encoder
checkpoint (--full-size: the official DeepEncoder shapes in bf16; default: the tiny test
encoder, for a CPU check), renders a few real pages and puts their images in the cache of 16
sessions, then for each worker count: starts the workers (worker i on CUDA device
devices[i], or the CPU without --devices), warms them up (two batches each: model load
and CUDA graph capture are not timed), queues --pages pages at --mode and times until every
page is acknowledged. Results: benchmarks/results/encode_workers.json (--out).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, ROOT, command, cpu_name, render_config, write_json

SESSIONS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_encoder(directory: Path, full_size: bool) -> Path:
    """An encoder-only checkpoint (what a worker loads)."""
    import json

    import torch
    from safetensors.torch import save_file

    from optical_memory.backends.deepseek_ocr.configuration import EncoderConfig
    from optical_memory.backends.deepseek_ocr.testing import (
        random_encoder_tensors,
        write_tiny_encoder,
    )

    directory.mkdir(parents=True, exist_ok=True)
    if not full_size:
        write_tiny_encoder(directory)
        return directory
    config = EncoderConfig()
    tensors = random_encoder_tensors(config, seed=1)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
        str(directory / "model.safetensors"),
    )
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    return directory


def page_images(fonts: str | None, count: int = 8) -> list:
    """`count` real pages of a synthetic conversation at the memory canvas."""
    from optical_memory.conversation import build_conversation
    from optical_memory.memory import OpticalMemory

    with tempfile.TemporaryDirectory() as tmp:
        mem = OpticalMemory(Path(tmp) / "m.sqlite3", render=render_config(fonts))
        mem.extend("s", build_conversation(400))
        records = [r for r in mem.pages("s") if r.sealed][:count]
        images = [mem.page_image("s", r) for r in records]
        mem.close()
    return images


def start_worker(url: str, prefix: str, model: Path, device: str | None, batch: int, log: Path):
    env = dict(os.environ)
    args = [
        sys.executable, "-m", "optical_memory.apps.cli", "worker", "--store", url, "--prefix",
        prefix, "--model", str(model), "--batch", str(batch),
    ]
    if device is None:
        args += ["--device", "cpu"]
    else:
        env["CUDA_VISIBLE_DEVICES"] = device
        args += ["--device", "cuda"]
    return subprocess.Popen(args, cwd=ROOT, env=env, stderr=log.open("wb"))


def wait_for(condition, what: str, limit_s: float = 600.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"encode_workers: gave up waiting for {what}")
        time.sleep(0.01)


def run(args: argparse.Namespace, url: str, model: Path, images: list, workers: int) -> dict:
    from optical_memory.cache import IMAGE_MODE, VisionCache, cache_key
    from optical_memory.encode_queue import queue_depth
    from optical_memory.stores.redis import RedisStore

    prefix = f"bench-{workers}-{os.getpid()}"
    store = RedisStore(url, prefix=prefix)
    cache = VisionCache(store)
    image_keys = {}
    for s in range(SESSIONS):
        for j, image in enumerate(images):
            key = cache_key(f"page-{j}", "bench", IMAGE_MODE, "")
            cache.put_image(f"session-{s}", key, image)
            image_keys[s, j] = key
    logs = [Path(args.logs) / f"worker-{workers}-{i}.log" for i in range(workers)]
    devices = args.devices.split(",") if args.devices else [None] * workers
    procs = [
        start_worker(url, prefix, model, devices[i], args.batch, logs[i]) for i in range(workers)
    ]
    try:
        wait_for(lambda: all("stream '" in log.read_text() for log in logs), "workers to start")
        stream = logs[0].read_text().split("stream '", 1)[1].split("'", 1)[0]
        counter = iter(range(10**9))

        def queue(n: int) -> None:
            pipe = store.client.pipeline(transaction=False)
            for _ in range(n):
                i = next(counter)
                s, j = i % SESSIONS, i % len(images)
                w, h = images[j].size
                pipe.xadd(stream, {
                    "v": "1", "sid": f"session-{s}", "mode": args.mode, "w": str(w), "h": str(h),
                    "key": hashlib.sha1(f"{prefix}-{i}".encode()).hexdigest(),
                    "img": image_keys[s, j], "idx": str(i),
                })
            pipe.execute()

        queue(2 * args.batch * workers)  # warm-up: loading, CUDA graph capture, allocator
        wait_for(lambda: queue_depth(store, stream) == 0, "the warm-up pages")
        start = time.perf_counter()
        queue(args.pages)
        wait_for(lambda: queue_depth(store, stream) == 0, "the timed pages")
        seconds = time.perf_counter() - start
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=120)
    summaries = [log.read_text().strip().splitlines()[-1] for log in logs]
    for key in store.client.scan_iter(match=f"{prefix}:*", count=1000):
        store.client.delete(key)
    store.close()
    return {
        "workers": workers,
        "devices": devices,
        "pages": args.pages,
        "seconds": round(seconds, 3),
        "pages_per_s": round(args.pages / seconds, 2),
        "worker_summaries": summaries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="a Redis URL (default: a redis-server of its own)")
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: random)")
    parser.add_argument("--full-size", action="store_true", help="random official-size encoder")
    parser.add_argument("--fonts", help="folder with DejaVuSans.ttf, -Bold, Mono (else installed)")
    parser.add_argument("--devices", help="CUDA devices, one per worker: 0,1 (default: CPU)")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (1,2)")
    parser.add_argument("--pages", type=int, default=256)
    parser.add_argument("--mode", default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "encode_workers.json")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    if args.devices and len(args.devices.split(",")) < max(counts):
        raise SystemExit("encode_workers: give one --devices entry per worker")
    tmp = Path(tempfile.mkdtemp(prefix="encode-workers-"))
    args.logs = tmp
    server = None
    url = args.store
    if url is None:
        port = free_port()
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp)],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        wait_for(lambda: _pings(redis, port), "redis-server")
    try:
        model = args.model or write_encoder(tmp / "encoder", args.full_size)
        images = page_images(args.fonts)
        results = [run(args, url, model, images, n) for n in counts]
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    gpus = ""
    if shutil.which("nvidia-smi"):
        gpus = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()
    base = results[0]["pages_per_s"]
    record = {
        "command": command("python benchmarks/encode_workers.py"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "gpus": gpus},
        "mode": args.mode,
        "batch": args.batch,
        "checkpoint": str(args.model) if args.model else ("full-size random" if args.full_size
                                                          else "tiny random"),
        "runs": results,
        "speedup": {str(r["workers"]): round(r["pages_per_s"] / base, 3) for r in results},
    }
    write_json(args.out, record)
    for r in results:
        print(f"{r['workers']} worker(s): {r['pages_per_s']} pages/s ({r['seconds']} s)")
    print(f"speed-up: {record['speedup']} -> {args.out}")


def _pings(redis, port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.2).ping())
    except redis.RedisError:
        return False


if __name__ == "__main__":
    main()
