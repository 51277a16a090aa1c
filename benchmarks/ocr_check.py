"""A real reader for the Fox-curve proxy: Tesseract reads evidence turns back from page images.

The planner scores a page at a tier by the expected precision that the
DeepSeek-OCR paper's Fox figures give its compression ratio (optical_memory.fox).
This checks that proxy against a reader we can run: for a sample of (turn,
page, tier), the page is taken as the model would receive it (`page_pngs`: the
1280x1280 memory page scaled to the tier's geometry with Lanczos, the PNG
`messages()` sends), Tesseract (`tesseract IMAGE stdout -l eng --psm 6`) reads
it, and the character error rate of the turn's text on that page is measured
against the best-matching span of Tesseract's output:

    CER = min over spans s of the output of Levenshtein(turn text, s) / len(turn text)

with whitespace collapsed to single spaces on both sides (rapidfuzz locates the
span with `partial_ratio_alignment`, then its ends are moved to the least edit
distance). Tesseract is tuned for about 300 dpi scans, so each image is also
read upscaled with Lanczos (`--scales 1 2`); every scale is reported.

Tesseract is not DeepEncoder: it has no language model of chat and no training
on these pages, so its CER is a floor on legibility, not the model's precision.

    python3 benchmarks/ocr_check.py [--conversations 2] [--pages 6] [--scales 1 2] [--jobs 2]
                                    [--tiers small tiny] [--out PATH]

Builds conversations with recall_data.make_conversations, pages each in a
temporary OpticalMemory (DeepSeek-OCR profile), samples pages that hold
questions' evidence turns (spread over the history), reads each sampled page at
every tier and writes benchmarks/results/ocr_check.json (every reading and a
per-tier summary), then prints the summary. Needs the `tesseract` binary
(Debian: tesseract-ocr; `scripts/setup.sh deepseek-ocr,redis,bench` installs it).

From code: `tier_cer(mem, session_id, samples)` reads (turn, page, tier) samples
of any memory; `plan_samples(plan, turns)` gives the samples of a plan (each
turn at its page's planned tier); `summarize(rows)` gives the per-tier table.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command, cpu_name, tesseract_version, write_json
from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

from optical_memory.modes import FADING_ORDER

RESULTS = RESULTS_DIR / "ocr_check.json"
TESSERACT_ARGS = ("-l", "eng", "--psm", "6")


# ----------------------------------------------------------------------- CER
def normalise(text: str) -> str:
    """Whitespace collapsed to single spaces, ends stripped."""
    return " ".join(text.split())


def span_cer(reference: str, ocr_text: str) -> float:
    """Character error rate of `reference` against the best-matching span of `ocr_text`
    (whitespace normalised): the least Levenshtein distance of the reference to any
    substring of the output, over the reference's length; 0..1 (the empty span costs 1)."""
    ref, hyp = normalise(reference), normalise(ocr_text)
    if not ref:
        return 0.0
    if len(hyp) <= len(ref):
        return min(1.0, Levenshtein.distance(ref, hyp) / len(ref))
    align = fuzz.partial_ratio_alignment(ref, hyp)
    start, end = align.dest_start, align.dest_end
    best = Levenshtein.distance(ref, hyp[start:end])
    slack = max(8, len(ref) // 8)
    for _ in range(3):  # move each end to its best place with the other fixed, until stable
        moved = False
        for s in range(max(0, start - slack), min(end, start + slack) + 1):
            d = Levenshtein.distance(ref, hyp[s:end], score_cutoff=best)
            if d < best:
                best, start, moved = d, s, True
        for e in range(max(start, end - slack), min(len(hyp), end + slack) + 1):
            d = Levenshtein.distance(ref, hyp[start:e], score_cutoff=best)
            if d < best:
                best, end, moved = d, e, True
        if not moved:
            break
    return min(1.0, best / len(ref))


# ----------------------------------------------------------------- Tesseract
def require_tesseract() -> str:
    """The tesseract binary's path; SystemExit with how to install it if it is missing."""
    path = shutil.which("tesseract")
    if path is None:
        sys.exit("tesseract not found: scripts/setup.sh deepseek-ocr,redis,bench "
                 "(or apt-get install tesseract-ocr)")
    return path


def read_png(png: bytes, scale: int = 1) -> str:
    """Tesseract's reading of a PNG (upscaled `scale` times with Lanczos first when > 1)."""
    if scale != 1:
        image = Image.open(io.BytesIO(png))
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        png = buffer.getvalue()
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        f.write(png)
        f.flush()
        run = subprocess.run(
            ["tesseract", f.name, "stdout", *TESSERACT_ARGS],
            capture_output=True, text=True, check=True,
            env={**os.environ, "OMP_THREAD_LIMIT": "1"},
        )
    return run.stdout


# ------------------------------------------------------------------ sampling
def turn_text_on_page(mem: Any, session_id: str, record: Any, turn: int) -> str:
    """The part of turn `turn`'s text that page `record` holds ("" if it holds none)."""
    turns = mem.store.turns(session_id, record.first_turn, record.last_turn + 1)
    held = [t for t in turns if t.index not in record.skipped]
    for t, text in zip(held, mem.pager.text_of(record, turns)):
        if t.index == turn:
            return text
    return ""


def plan_samples(plan: Any, turns: Iterable[int]) -> list[tuple[int, int, str]]:
    """(turn, page index, planned tier) for each of `turns` on a page the plan keeps in
    context as an image (turns in the recent text, or on pages out of the context, have none)."""
    wanted = set(turns)
    return [
        (t, p.index, p.mode)
        for p in plan.pages if p.mode in FADING_ORDER
        for t in range(p.first_turn, p.last_turn + 1) if t in wanted
    ]


def _precision(text_tokens: int, tier: Any) -> tuple[int, float, float | None]:
    """(vision tokens as the paper counts them, compression, expected Fox precision)."""
    tokens = getattr(tier, "tokens", 0) or tier.cost
    try:
        from optical_memory.fox import page_precision
    except ImportError:  # the Fox module is optional here: CER is measured all the same
        return tokens, text_tokens / tokens, None
    return tokens, text_tokens / tokens, page_precision(text_tokens, tokens)


def tier_cer(
    mem: Any,
    session_id: str,
    samples: Iterable[tuple[int, Any, str]],
    *,
    scales: Sequence[int] = (1,),
    jobs: int = 2,
) -> list[dict[str, Any]]:
    """Tesseract's CER of each sample (turn, page index or PageRecord, tier) at each scale.

    The page image is `mem.page_pngs` at the tier's geometry (what `messages()` sends); a
    page image is read once per geometry and scale (gundam and large share 1280x1280).
    Each row: turn, page, tier, width, height, scale, page text tokens, vision tokens (the
    paper's count), compression, expected precision (Fox; None without optical_memory.fox),
    reference characters, CER.
    """
    require_tesseract()
    records = {r.index: r for r in mem.pages(session_id)}
    tiers = mem.tiers
    cases = []
    for turn, page, tier_name in samples:
        record = records[page if isinstance(page, int) else page.index]
        text = turn_text_on_page(mem, session_id, record, turn)
        if text.strip():
            cases.append((turn, record, tiers[tier_name], text))
    images: dict[tuple[str, int, int], tuple[Any, Any]] = {}
    for _, record, tier, _ in cases:
        images.setdefault((record.content_hash, tier.width, tier.height), (record, tier))
    keys = list(images)
    pngs = mem.page_pngs(session_id, [images[k] for k in keys]) if keys else []
    png_of = {k: base64.b64decode(p) for k, p in zip(keys, pngs)}
    reads = [(k, s) for k in keys for s in scales]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        texts = dict(zip(reads, pool.map(lambda j: read_png(png_of[j[0]], j[1]), reads)))
    rows = []
    for turn, record, tier, text in cases:
        vision, ratio, precision = _precision(record.text_tokens, tier)
        for scale in scales:
            ocr_text = texts[((record.content_hash, tier.width, tier.height), scale)]
            rows.append({
                "turn": turn, "page": record.index, "tier": tier.name,
                "width": tier.width, "height": tier.height, "scale": scale,
                "page_text_tokens": record.text_tokens, "vision_tokens": vision,
                "compression": round(ratio, 2),
                "expected_precision": None if precision is None else round(precision, 4),
                "reference_chars": len(normalise(text)),
                "cer": round(span_cer(text, ocr_text), 4),
            })
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per tier and scale: readings, mean / median / 90th-percentile CER, mean 1 - CER beside
    the mean expected precision and compression."""
    out = []
    order = {t: i for i, t in enumerate(FADING_ORDER)}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["tier"], r["scale"]), []).append(r)
    for (tier, scale), group in sorted(groups.items(), key=lambda g: (g[0][1], order[g[0][0]])):
        cers = sorted(r["cer"] for r in group)
        expected = [r["expected_precision"] for r in group if r["expected_precision"] is not None]
        out.append({
            "tier": tier, "scale": scale, "width": group[0]["width"], "n": len(group),
            "cer_mean": round(statistics.fmean(cers), 4),
            "cer_median": round(statistics.median(cers), 4),
            "cer_p90": round(cers[min(len(cers) - 1, int(0.9 * len(cers)))], 4),
            "read_mean": round(1 - statistics.fmean(cers), 4),
            "expected_precision_mean": round(statistics.fmean(expected), 4) if expected else None,
            "compression_mean": round(statistics.fmean(r["compression"] for r in group), 2),
        })
    return out


def table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a text table."""
    fmt = "{:<7} {:>5} {:>6} {:>4} {:>9} {:>10} {:>8} {:>9} {:>9}"
    lines = [fmt.format("tier", "scale", "px", "n", "CER mean", "CER median", "CER p90",
                        "1 - CER", "Fox exp.")]
    for s in summary:
        fox = "-" if s["expected_precision_mean"] is None else f"{s['expected_precision_mean']:.3f}"
        lines.append(fmt.format(
            s["tier"], f"{s['scale']}x", s["width"], s["n"], f"{s['cer_mean']:.1%}",
            f"{s['cer_median']:.1%}", f"{s['cer_p90']:.1%}", f"{s['read_mean']:.3f}", fox,
        ))
    return "\n".join(lines)


# ----------------------------------------------------------------------- CLI
def _sample_pages(mem: Any, conv: Any, pages: int) -> list[tuple[int, int]]:
    """(turn, page index) of questions' evidence turns on `pages` sealed pages spread over the
    history (every evidence turn of a chosen page)."""
    evidence = sorted({t for q in conv.questions for t in q.evidence})
    held: dict[int, list[int]] = {}
    for record in mem.pages(conv.session_id):
        if record.sealed:
            for t in evidence:
                if record.first_turn <= t <= record.last_turn and t not in record.skipped:
                    held.setdefault(record.index, []).append(t)
    indexes = sorted(held)
    if len(indexes) > pages:
        step = (len(indexes) - 1) / max(1, pages - 1)
        indexes = sorted({indexes[round(i * step)] for i in range(pages)})
    return [(t, i) for i in indexes for t in held[i]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=2, help="conversations to build")
    ap.add_argument("--seed", type=int, default=0, help="recall_data seed")
    ap.add_argument("--pages", type=int, default=6, help="sampled pages per conversation")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 2], help="upscale factors")
    ap.add_argument("--tiers", nargs="+", default=list(FADING_ORDER), choices=FADING_ORDER,
                    help="tiers to read (default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="Tesseract processes at once")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    require_tesseract()
    from recall_data import make_conversations

    from optical_memory import OpticalMemory

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, OpticalMemory(Path(tmp) / "m.sqlite3") as mem:
        for conv in make_conversations(args.conversations, args.seed):
            mem.extend(conv.session_id, conv.messages)
            picked = _sample_pages(mem, conv, args.pages)
            samples = [(t, p, tier) for t, p in picked for tier in args.tiers]
            got = tier_cer(mem, conv.session_id, samples, scales=args.scales, jobs=args.jobs)
            for r in got:
                r["session_id"] = conv.session_id
            rows += got
            print(f"{conv.session_id}: {len({p for _, p in picked})} pages, "
                  f"{len(picked)} evidence turns, {len(got)} readings", flush=True)
        profile = mem.profile.name
    summary = summarize(rows)
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "tesseract": tesseract_version()},
        "command": command("python3 benchmarks/ocr_check.py"),
        "profile": profile,
        "reader": "tesseract IMAGE stdout " + " ".join(TESSERACT_ARGS)
        + "; image = page_pngs at the tier's geometry, upscaled by `scale` with Lanczos",
        "cer": "min over spans of the OCR output of Levenshtein(turn text on the page, span) / "
        "len(turn text), whitespace collapsed",
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "rows": rows,
    }
    write_json(args.out, result)
    print(table(summary))
    print(f"wrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
