"""Recall: how readable the evidence of each question is in the planned context, per method.

Long conversations come from `recall_data.make_conversations` (deterministic: several
hundred turns each over many dated sessions, planted facts at various ages, questions
that paraphrase them, multi-hop and temporal questions, the evidence turns of each
known). Each conversation is stored in an embedded memory with the DeepSeek-OCR
profile (8192-position window) and every question is planned at the end of it.
Methods, side by side at the same window:

- truncation: the newest turns as text, as many as fit (the usual chat-history cut);
- schedule: the fixed age schedule (Policy(planner="schedule")), no query;
- readable: the readable planner without the query;
- readable+query: with the query's BM25 hits raising their pages, no verbatim recall;
- readable+verbatim: the default: the query's best turns also restored as exact text.

A question's evidence score is the expected precision (optical_memory.fox) of its
worst evidence turn in the context (text 1.0, out 0.0; `Plan.turn_precision`);
"sharp" means every evidence turn at 0.95 or better. Methods planned without the
query leave room for it (their budget is the window less the question's positions). Also reported: positions used, the expected
readable fraction of the history, plan time (median, one CPU), and BM25 retrieval
time on a 10,000-turn session (warm: its index built by an earlier search).

    python benchmarks/recall.py [--conversations 8] [--window 8192] [--out benchmarks/results/recall.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import RESULTS_DIR, command, cpu_name, write_json
from recall_data import Conversation, make_conversations

from optical_memory.conversation import build_conversation
from optical_memory.memory import OpticalMemory
from optical_memory.policy import Policy
from optical_memory.prompt import format_query, format_turns
from optical_memory.stores.base import Store

SHARP = 0.95
METHODS = {
    "schedule": (Policy(planner="schedule"), False),
    "readable": (Policy(), False),
    "readable+query": (Policy(verbatim_tokens=0), True),
    "readable+verbatim": (Policy(), True),
}


def truncation(mem: OpticalMemory, session: str, query: str) -> tuple[set[int], int]:
    """Turns the newest-first text cut keeps in the window, and the positions it uses."""
    policy = mem.policy
    count = mem.counter.count
    used = count(format_query(query)) + policy.answer_tokens + policy.overhead
    kept: set[int] = set()
    for turn in reversed(mem.turns(session)):
        cost = count(format_turns([turn])) + 1
        if used + cost > mem.window:
            break
        used += cost
        kept.add(turn.index)
    return kept, used


def evaluate(
    conversations: list[Conversation], directory: Path, window: int
) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {name: [] for name in ("truncation", *METHODS)}
    for conv in conversations:
        memories = {
            name: OpticalMemory(directory / f"{name}.sqlite3", policy=replace(policy, window=window))
            for name, (policy, _) in METHODS.items()
        }
        for mem in memories.values():
            mem.extend(conv.session_id, conv.chat())
            mem.pages(conv.session_id)
        for q in conv.questions:
            kept, used = truncation(memories["readable"], conv.session_id, q.text)
            rows["truncation"].append({
                "kind": q.kind, "positions": used,
                "score": min(1.0 if t in kept else 0.0 for t in q.evidence),
            })
            for name, (_, with_query) in METHODS.items():
                mem = memories[name]
                # planned without the query, a method still leaves room for it
                asked = 0 if with_query else mem.counter.count(format_query(q.text))
                start = time.perf_counter()
                plan = mem.plan(
                    conv.session_id, q.text if with_query else None, budget=window - asked
                )
                ms = (time.perf_counter() - start) * 1e3
                rows[name].append({
                    "kind": q.kind,
                    "score": min(plan.turn_precision(t) for t in q.evidence),
                    "positions": plan.total + asked,
                    "readable": plan.readable,
                    "plan_ms": ms,
                    "fits": plan.fits and plan.total + asked <= window,
                })
        for mem in memories.values():
            mem.close()
    return rows


def summarise(rows: list[dict]) -> dict:
    scores = [r["score"] for r in rows]
    out = {
        "questions": len(rows),
        "mean_evidence_score": statistics.fmean(scores),
        "sharp_fraction": sum(s >= SHARP for s in scores) / len(scores),
        "mean_positions": statistics.fmean(r["positions"] for r in rows),
        "max_positions": max(r["positions"] for r in rows),
        "by_kind": {
            kind: statistics.fmean(r["score"] for r in rows if r["kind"] == kind)
            for kind in sorted({r["kind"] for r in rows})
        },
    }
    if "plan_ms" in rows[0]:
        out["plan_ms_median"] = statistics.median(r["plan_ms"] for r in rows)
        out["mean_readable"] = statistics.fmean(r["readable"] for r in rows)
        out["all_fit"] = all(r["fits"] for r in rows)
    return out


def timed(fn, repeats: int) -> dict[str, float]:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median": statistics.median(times), "max": max(times)}


def retrieval_timing(directory: Path, turns: int = 10_000, repeats: int = 30) -> dict:
    """BM25 retrieval and a plan with a query on one long session (pages already sealed)."""
    mem = OpticalMemory(directory / "long.sqlite3")
    mem.extend("long", build_conversation(turns))
    queries = ["When do we launch?", "what did we decide about the database migration",
               "who is handling the budget review", "remind me about the dentist"]
    out: dict = {"turns": turns}
    start = time.perf_counter()
    Store.search(mem.store, "long", queries[0], 8)  # builds the session's index
    out["index_build_ms"] = (time.perf_counter() - start) * 1e3
    out["search_ms"] = timed(lambda i: mem.search("long", queries[i % len(queries)], 8), repeats)
    mem.plan("long", queries[0])  # seals the pages (FreeType layout): not part of a plan
    out["plan_with_query_ms"] = timed(lambda i: mem.plan("long", queries[i % len(queries)]), repeats)
    out["plan_ms"] = timed(lambda i: mem.plan("long"), repeats)
    mem.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=8192, help="decoder positions (default 8192)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "recall.json"))
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    conversations = make_conversations(args.conversations, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        rows = evaluate(conversations, Path(tmp), args.window)
        timing = retrieval_timing(Path(tmp))
    methods = {name: summarise(r) for name, r in rows.items()}
    truncated = methods["truncation"]["mean_evidence_score"]
    best = methods["readable+verbatim"]
    result = {
        "command": command("python benchmarks/recall.py", argv=argv),
        "machine": {"cpu": cpu_name(), "python": platform.python_version(), "cores_used": 1,
                    "load_average": os.getloadavg()[0]},
        "window": args.window,
        "conversations": len(conversations),
        "turns": [len(c.messages) for c in conversations],
        "questions": sum(len(c.questions) for c in conversations),
        "methods": methods,
        "retrieval": timing,
        "goals": {
            "mean_at_least_0.97": best["mean_evidence_score"] >= 0.97,
            "sharp_at_least_90%": best["sharp_fraction"] >= 0.90,
            "truncation_plus_0.30": best["mean_evidence_score"] >= truncated + 0.30,
        },
    }
    write_json(args.out, result)
    print(f"{'method':<18} {'mean':>6} {'sharp':>6} {'positions':>9} {'plan ms':>8}")
    for name, m in methods.items():
        print(f"{name:<18} {m['mean_evidence_score']:>6.3f} {m['sharp_fraction']:>6.1%} "
              f"{m['mean_positions']:>9.0f} {m.get('plan_ms_median', 0):>8.2f}")
    print("retrieval:", timing)
    print("goals:", result["goals"])


if __name__ == "__main__":
    sys.exit(main())
