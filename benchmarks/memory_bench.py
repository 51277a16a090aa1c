"""Memory benchmarks: append latency, plan latency, demo wall time, cache bytes per page.

- append: p50/p99 of OpticalMemory.append (one turn, durable before return) on the
  embedded SQLite file and on Redis; baseline in the same run, called alternately
  with ours: the bare store write with the same durability (SQLite INSERT + COMMIT
  in WAL with synchronous=FULL; Redis RPUSH), as a ratio.
- plan: OpticalMemory.plan with a query once pages are sealed, at 100, 1000 and
  10000 turns, median of repeated calls, pinned to one CPU; baseline in the same
  run: counting the whole history as plain text with the same tokenizer (what a
  text-only memory does to fit its window), as a ratio. The first plan, which
  seals the pages (FreeType layout), is recorded too.
- demo: wall time of `optical-memory demo` (1000 turns, fresh store).
- cache: bytes of one cache entry per mode (bf16 and fp32 embeddings of a
  1280x1280 page at 1280 wide; our header included) and of a cached page PNG.

    python3 benchmarks/memory_bench.py [--redis redis://127.0.0.1:6379/15] [--appends 500]

Writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from common import RESULTS_DIR, command, cpu_name, write_json

from optical_memory.cache import cache_key, tensor_to_bytes
from optical_memory.conversation import build_conversation
from optical_memory.demo import run_demo
from optical_memory.memory import OpticalMemory
from optical_memory.modes import FADING_ORDER, MODES
from optical_memory.stores.redis import RedisStore
from optical_memory.tokens import default_counter

RESULTS = RESULTS_DIR / "memory.json"


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_ms": round(1000 * s[len(s) // 2], 3),
        "p99_ms": round(1000 * s[min(len(s) - 1, int(len(s) * 0.99))], 3),
    }


def time_each(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def time_pair(ours, base, n: int) -> tuple[list[float], list[float]]:
    """Latencies of `ours` and `base`, called alternately so both see the same machine."""
    a, b = [], []
    for i in range(n):
        t = time.perf_counter()
        ours(i)
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        base(i)
        b.append(time.perf_counter() - t)
    return a, b


def compare(ours: list[float], base: list[float], base_name: str) -> dict:
    return {
        "optical_memory": percentiles(ours),
        base_name: percentiles(base),
        "ratio_p50": round(statistics.median(ours) / statistics.median(base), 2),
    }


def bench_append(redis_url: str, n: int, workdir: Path) -> dict:
    results = {}
    # embedded SQLite
    mem = OpticalMemory(workdir / "append.sqlite3")
    db = sqlite3.connect(workdir / "bare.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, content TEXT)")

    def bare_sqlite(i: int) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, ?)", (i, f"turn {i} " * 20))
        db.execute("COMMIT")

    ours, base = time_pair(
        lambda i: mem.append("bench", "user", f"turn {i} " * 20, turn_id=f"t{i}"), bare_sqlite, n
    )
    results["sqlite"] = compare(ours, base, "baseline_bare_insert_commit")
    # Redis
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    try:
        mem = OpticalMemory(RedisStore(redis_url, prefix=prefix))
        key = f"{prefix}:bare"
        ours, base = time_pair(
            lambda i: mem.append("bench", "user", f"turn {i} " * 20, turn_id=f"t{i}"),
            lambda i: client.rpush(key, f"turn {i} " * 20),
            n,
        )
        results["redis"] = compare(ours, base, "baseline_bare_rpush")
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    return results


def bench_plan(sizes: list[int], workdir: Path, repeats: int) -> dict:
    out = {}
    counter = default_counter()
    for n in sizes:
        messages = build_conversation(n, seed=n)
        mem = OpticalMemory(workdir / f"plan-{n}.sqlite3")
        mem.extend("s", messages)
        t = time.perf_counter()
        mem.plan("s", query="When do we launch?")
        first = time.perf_counter() - t
        samples = time_each(lambda _, m=mem: m.plan("s", query="When do we launch?"), repeats)
        text = [m["content"] for m in messages]
        base = time_each(lambda _, t=text: sum(counter.count(c) for c in t), max(3, repeats // 10))
        plan = mem.plan("s", query="When do we launch?")
        out[str(n)] = {
            "plan_median_ms": round(1000 * statistics.median(samples), 3),
            "plan_p99_ms": percentiles(samples)["p99_ms"],
            "first_plan_with_paging_s": round(first, 3),
            "pages": len(plan.pages),
            "baseline_count_history_ms": round(1000 * statistics.median(base), 3),
            "ratio_plan_to_baseline": round(
                statistics.median(samples) / statistics.median(base), 4
            ),
        }
        mem.close()
    return out


def bench_turn_loop(workdir: Path, turns: int = 300, steps: int = 60) -> dict:
    """A chat or agent loop: append one turn, then plan (the open page is laid out again each
    time); against planning again with no new turn (the open page memoised), same run."""
    messages = build_conversation(turns + steps, seed=7)
    mem = OpticalMemory(workdir / "loop.sqlite3")
    mem.extend("s", messages[:turns])
    mem.plan("s", query="When do we launch?")
    grown, still = [], []
    for m in messages[turns:]:
        t = time.perf_counter()
        mem.append("s", m["role"], m["content"])
        mem.plan("s", query="When do we launch?")
        grown.append(time.perf_counter() - t)
        t = time.perf_counter()
        mem.plan("s", query="When do we launch?")
        still.append(time.perf_counter() - t)
    mem.close()
    return {
        "turns": turns,
        "steps": steps,
        "append_and_plan_median_ms": round(1000 * statistics.median(grown), 3),
        "plan_again_median_ms": round(1000 * statistics.median(still), 3),
        "ratio": round(statistics.median(grown) / statistics.median(still), 3),
    }


def bench_cache(workdir: Path) -> dict:
    import torch

    from renderers import RenderConfig

    canvas = RenderConfig.for_mode("gundam")
    out = {}
    for mode in FADING_ORDER:
        tokens = MODES[mode].vision_tokens(canvas.width, canvas.height)
        key = cache_key("page", "render", mode, "model")
        out[mode] = {
            "vision_tokens": tokens,
            "bf16_bytes": len(
                tensor_to_bytes(key, torch.zeros(tokens, 1280, dtype=torch.bfloat16))
            ),
            "fp32_bytes": len(tensor_to_bytes(key, torch.zeros(tokens, 1280, dtype=torch.float32))),
        }
    mem = OpticalMemory(workdir / "cache.sqlite3")
    mem.extend("s", build_conversation(300))
    sealed = [p for p in mem.pages("s") if p.sealed]
    for p in sealed:
        mem.page_image("s", p)
    info = mem.store.info("s")
    out["page_png"] = {"pages": len(sealed), "mean_bytes": info.cache_bytes // max(1, len(sealed))}
    return out


def machine() -> dict:
    return {
        "cpu": cpu_name(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--appends", type=int, default=500)
    parser.add_argument("--plan-repeats", type=int, default=50)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin the plan benchmark to")
    args = parser.parse_args()
    result = {"machine": machine(), "command": command(Path(sys.argv[0]).name)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("append latency ...", flush=True)
        result["append"] = bench_append(args.redis, args.appends, work)
        print("demo ...", flush=True)
        t = time.perf_counter()
        demo = run_demo(work / "demo", progress=False)
        result["demo"] = {
            "turns": demo.plan.turns,
            "pages": len(demo.plan.pages),
            "wall_s": round(time.perf_counter() - t, 2),
            "steps_s": {k: round(v, 2) for k, v in demo.seconds.items()},
        }
        print("plan latency (one CPU) ...", flush=True)
        os.sched_setaffinity(0, {args.cpu})
        result["plan"] = bench_plan(
            [int(s) for s in args.sizes.split(",")], work, args.plan_repeats
        )
        print("append + plan loop (one CPU) ...", flush=True)
        result["turn_loop"] = bench_turn_loop(work)
        print("cache entry sizes ...", flush=True)
        result["cache_bytes_per_page"] = bench_cache(work)
    write_json(RESULTS, result, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
