"""`mem.messages()`: the planned context as OpenAI chat messages, with page PNGs from the cache.

For each profile, on a fresh embedded store holding the synthetic 1000-turn
conversation: the first call (pages sealed, PNGs rendered at the profile's tier
geometry and cached), then repeated calls with every page cached. Baselines
measured in the same run, calls alternating: `plan()` alone (the part of a call
that is not images), and the same messages built with PNGs rendered afresh
(what a call would cost without the cache). One CPU (`sched_setaffinity`), as
the plan benchmark.

    python benchmarks/messages_bench.py --out benchmarks/results/messages.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, command, cpu_name, write_json

from optical_memory.backends import get_profile
from optical_memory.cache import encode_png
from optical_memory.conversation import build_conversation
from optical_memory.memory import OpticalMemory

QUERY = "When is the launch, and what is the budget?"


def summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in samples)
    return {
        "median_ms": round(statistics.median(ms), 2),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2),
        "max_ms": round(ms[-1], 2),
        "n": len(ms),
    }


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def uncached_pngs(mem: OpticalMemory, session: str) -> int:
    """The same PNGs as one messages() call, rendered and resized afresh: bytes produced."""
    prompt = mem.prompt(session, QUERY)
    total = 0
    for page in prompt.pages:
        image = mem.pager.image(session, page.record)
        size = (page.tier.width, page.tier.height)
        total += len(encode_png(image if image.size == size else image.resize(size)))
    return total


def run_profile(profile: str, turns: int, repeats: int, directory: Path, window: int) -> dict:
    # one window for every profile: at their own (32k, 128k) this history is sent as text
    mem = OpticalMemory(
        directory / f"{profile}.sqlite3", profile=get_profile(profile, window=window)
    )
    mem.extend("bench", build_conversation(turns))
    first = timed(lambda: mem.messages("bench", QUERY))
    messages = mem.messages("bench", QUERY)
    ours, plans, fresh = [], [], []
    for _ in range(repeats):
        ours.append(timed(lambda: mem.messages("bench", QUERY)))
        plans.append(timed(lambda: mem.plan("bench", QUERY)))
    for _ in range(max(1, repeats // 10)):
        fresh.append(timed(lambda: uncached_pngs(mem, "bench")))
    plan = mem.plan("bench", QUERY)
    parts = next((m["content"] for m in messages if isinstance(m["content"], list)), [])
    pages = [p for p in parts if p["type"] == "image_url"]
    mem.close()
    result = {
        "profile": profile,
        "pages_in_context": len(plan.in_context()),
        "tiers": {row["tier"]: row["pages"] for row in plan.to_dict()["tiers"]},
        "image_bytes_base64": sum(len(p["image_url"]["url"]) for p in pages),
        "messages_json_bytes": len(json.dumps(messages)),
        "first_call_s": round(first, 2),
        "messages_cached": summary(ours),
        "plan_only": summary(plans),
        "pngs_rendered_afresh": summary(fresh),
    }
    result["ratio_cached_to_uncached"] = round(
        result["messages_cached"]["median_ms"] / result["pngs_rendered_afresh"]["median_ms"], 4
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "messages.json")
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--profiles", nargs="+", default=["deepseek-ocr", "qwen2.5-vl", "gpt-4o"])
    parser.add_argument("--window", type=int, default=8192, help="the same window for every profile")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run_profile(p, args.turns, args.repeats, Path(tmp), args.window) for p in args.profiles
        ]
    for r in results:
        print(
            f"{r['profile']:<14} {r['pages_in_context']} pages, messages() median "
            f"{r['messages_cached']['median_ms']} ms (p90 {r['messages_cached']['p90_ms']}), "
            f"plan {r['plan_only']['median_ms']} ms, PNGs afresh "
            f"{r['pngs_rendered_afresh']['median_ms']} ms, first call {r['first_call_s']} s"
        )
    write_json(
        args.out,
        {
            "command": command("benchmarks/messages_bench.py", argv=sys.argv[1:]),
            "machine": {"cpu": cpu_name(), "cpus_used": 1, "python": platform.python_version()},
            "turns": args.turns,
            "window": args.window,
            "query": QUERY,
            "results": results,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
