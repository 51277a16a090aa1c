"""Forgetting curve of memory pages: legibility and compression of each mode's view of one 1280 page.

The memory renders every page once at the 1280x1280 Gundam canvas and derives
the other modes from that image with the encoder's preprocessing
(optical_memory.backends.deepseek_ocr.preprocess): Gundam's local tiles are native-resolution
crops (so it reads like Large), Large pads 1280 to 1280 (the page as it is),
Base scales it to 1024, Small to 640, Tiny to 512. For each memory-page font
size this script renders the first full page of legibility.py's multilingual
transcript (common.transcript) at 1280, builds each mode's view, reads it back with Tesseract
(legibility.py's settings and CER), and records per font size and mode the
text tokens per page, the vision tokens, their ratio and the CER. Text tokens
are also given for the demo conversation (optical_memory/conversation.py:
short English chat turns), whose pages hold far fewer tokens than the dense
transcript page; that is the density the forgetting policy sees.

    python3 benchmarks/forgetting_curve.py [--jobs 2] [--sizes 12,14,16,18] [--replot]

Writes benchmarks/results/forgetting_curve.json and forgetting_curve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from common import (
    CER_LIMIT,
    RESULTS_DIR,
    cer,
    command,
    cpu_name,
    ocr,
    require_tesseract,
    tesseract_version,
    transcript,
    write_json,
)
from PIL import Image

from optical_memory.backends.deepseek_ocr.preprocess import global_view, local_tiles
from optical_memory.conversation import build_conversation
from optical_memory.modes import FADING_ORDER, get_mode
from optical_memory.tokens import TokenCounter, default_counter
from renderers import RenderConfig, Renderer

DEMO_TURNS = 1000
CROP = (22, 40, 262, 112)  # left, top, right, bottom: the first text lines below the role label


def mode_view(page: Image.Image, mode_name: str) -> Image.Image:
    """What `mode` resolves of the page: Gundam's tiles stitched back together, else its global view."""
    mode = get_mode(mode_name)
    grid = mode.tile_grid(*page.size)
    if grid == (1, 1):
        return global_view(page, mode)
    across, down = grid
    t = mode.tile_size
    stitched = Image.new("RGB", (across * t, down * t))
    for i, tile in enumerate(local_tiles(page, mode, grid)):
        stitched.paste(tile, ((i % across) * t, (i // across) * t))
    return stitched


def chat_tokens_per_page(config: RenderConfig, counter: TokenCounter) -> float:
    """Mean text tokens over the full pages of the demo conversation at `config`."""
    pages = Renderer(config, counter).paginate(build_conversation(DEMO_TURNS))
    return float(np.mean([p.text_tokens for p in pages if p.full]))


def densest_legible(rows: list[dict]) -> int | None:
    """The smallest font size whose native view (Large) has CER <= CER_LIMIT and whose chat
    pages hold more text tokens than Gundam costs; None when no measured size qualifies."""
    ok = [
        r["font_size"]
        for r in rows
        if r["mode"] == "large"
        and r["cer"] <= CER_LIMIT
        and r["chat_text_tokens_per_page"] > get_mode("gundam").vision_tokens(1280, 1280)
    ]
    return min(ok) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="Tesseract processes at once")
    ap.add_argument("--sizes", default="12,14,16,18", help="memory-page font sizes in px at 1280")
    ap.add_argument(
        "--replot", action="store_true", help="redraw the PNG from the recorded JSON, no OCR"
    )
    args = ap.parse_args()
    require_tesseract()
    sizes = [int(s) for s in args.sizes.split(",")]
    messages = transcript()
    counter = default_counter()

    cases = []  # (size, config, page, {mode: view}, reference)
    for size in sizes:
        config = RenderConfig.for_mode("gundam", font_size=size)
        renderer = Renderer(config, counter)
        pages = renderer.paginate(messages)
        page = next((p for p in pages if p.full), pages[0])
        reference = "\n".join(text for _, text in renderer.page_lines(messages, page))
        image = renderer.render(page)
        views = {m: mode_view(image, m) for m in FADING_ORDER}
        cases.append((size, config, page, views, reference))

    if args.replot:
        recorded = json.loads((RESULTS_DIR / "forgetting_curve.json").read_text())
        plot(recorded["rows"], cases, RESULTS_DIR / "forgetting_curve.png")
        return

    # Gundam's tiles are crops of the page at its own resolution: when its stitched view is
    # byte-identical to Large's, one OCR serves both.
    jobs = []
    for size, _, _, views, _ in cases:
        for m, view in views.items():
            if m == "gundam" and np.array_equal(np.asarray(view), np.asarray(views["large"])):
                continue
            jobs.append((size, m, view))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(args.jobs) as pool:
        texts = dict(
            zip(
                [(s, m) for s, m, _ in jobs],
                pool.map(lambda j: ocr(j[2], workdir, f"{j[0]}-{j[1]}"), jobs),
            )
        )
    ocr_seconds = time.perf_counter() - started

    rows = []
    for size, config, page, views, reference in cases:
        chat_tokens = chat_tokens_per_page(config, counter)
        for m in FADING_ORDER:
            read = (size, m) if (size, m) in texts else (size, "large")
            vision = get_mode(m).vision_tokens(config.width, config.height)
            rows.append(
                {
                    "font_size": size,
                    "mode": m,
                    "view": f"{views[m].width}x{views[m].height}",
                    "effective_font_px": round(size * views[m].width / config.width, 1),
                    "ocr_of": read[1],
                    "lines_per_page": config.lines_per_page,
                    "text_tokens_per_page": page.text_tokens,
                    "vision_tokens": vision,
                    "compression": round(page.text_tokens / vision, 2),
                    "chat_text_tokens_per_page": round(chat_tokens, 1),
                    "chat_compression": round(chat_tokens / vision, 2),
                    "cer": round(cer(reference, texts[read]), 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "tesseract": tesseract_version()},
        "command": command("python3 benchmarks/forgetting_curve.py"),
        "page": "first full page of legibility.transcript() rendered at the 1280x1280 gundam canvas (margin 22)",
        "views": "optical_memory.backends.deepseek_ocr.preprocess: gundam = its 640 local tiles stitched, other modes = global view",
        "ocr": "tesseract -l eng+rus+ell+chi_sim --psm 6 on the view upscaled 2x (Lanczos), as legibility.py",
        "chat_pages": f"mean over the full pages of optical_memory.conversation.build_conversation({DEMO_TURNS})",
        "text_tokenizer": counter.name,
        "cer_limit": CER_LIMIT,
        "ocr_seconds": round(ocr_seconds, 1),
        "rule": f"smallest size with Large CER <= {CER_LIMIT} and chat text tokens per page > Gundam's vision tokens",
        "chosen_font_size": densest_legible(rows),
        "memory_page_font_size": RenderConfig.memory_page().font_size,
        "rows": rows,
    }
    write_json(RESULTS_DIR / "forgetting_curve.json", result, indent=2)
    plot(rows, cases, RESULTS_DIR / "forgetting_curve.png")
    if result["chosen_font_size"] != result["memory_page_font_size"]:
        print(
            f"note: RenderConfig.memory_page() uses {result['memory_page_font_size']} px, "
            f"the measured choice is {result['chosen_font_size']} px"
        )


def plot(rows: list[dict], cases: list, path: Path) -> None:
    """CER and compression by mode (one line per font size), and a crop of each mode's view."""
    sizes = [c[0] for c in cases]
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(sizes)))
    fig = plt.figure(figsize=(13, 11))
    grid = fig.add_gridspec(
        1 + len(sizes), 2 * len(FADING_ORDER), height_ratios=[4] + [1] * len(sizes)
    )
    ax_cer = fig.add_subplot(grid[0, : len(FADING_ORDER)])
    ax_cmp = fig.add_subplot(grid[0, len(FADING_ORDER) :])
    x = np.arange(len(FADING_ORDER))
    for size, color in zip(sizes, colors):
        r = [
            next(row for row in rows if row["font_size"] == size and row["mode"] == m)
            for m in FADING_ORDER
        ]
        ax_cer.plot(x, [100 * row["cer"] for row in r], "o-", color=color, label=f"{size} px page")
        ax_cmp.plot(
            x,
            [row["chat_compression"] for row in r],
            "o-",
            color=color,
            label=f"{size} px, demo chat ({r[0]['chat_text_tokens_per_page']:.0f} tok/page)",
        )
        ax_cmp.plot(
            x,
            [row["compression"] for row in r],
            "o--",
            color=color,
            alpha=0.45,
            label=f"{size} px, dense transcript ({r[0]['text_tokens_per_page']} tok/page)",
        )
    ax_cer.axhline(100 * CER_LIMIT, color="grey", ls=":", lw=1)
    ax_cer.text(
        x[-1], 100 * CER_LIMIT, f" {100 * CER_LIMIT:.0f}% ", va="bottom", ha="right", color="grey"
    )
    ax_cer.set_yscale("log")
    ax_cer.set_ylabel("Tesseract CER (%), log scale")
    ax_cer.set_title("Legibility of each mode's view of one 1280 memory page")
    ax_cmp.axhline(1.0, color="grey", ls=":", lw=1)
    ax_cmp.text(x[-1], 1.0, "text = vision tokens ", va="bottom", ha="right", color="grey")
    ax_cmp.set_yscale("log")
    ax_cmp.set_ylabel("text tokens per vision token, log scale")
    ax_cmp.set_title("Compression per page")
    ax_cmp.legend(fontsize=7, loc="upper left")
    ax_cer.legend(fontsize=8, loc="upper left")
    for ax, ticks in ((ax_cer, (2, 3, 5, 10, 20, 50, 100)), (ax_cmp, (1, 2, 5, 10, 20, 50))):
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(x, [f"{m}\n{get_mode(m).vision_tokens(1280, 1280)} vt" for m in FADING_ORDER])
        ax.set_xlabel("mode (older pages to the right)")
        ax.grid(alpha=0.3, which="both")
    # the same region of the page (CROP, in 1280-canvas pixels) as each mode resolves it,
    # scaled back to the canvas' pixels
    for i, (size, _, _, views, _) in enumerate(cases, start=1):
        for j, m in enumerate(FADING_ORDER):
            view = views[m]
            k = view.width / 1280
            box = tuple(round(c * k) for c in CROP)
            crop = view.crop(box).resize((CROP[2] - CROP[0], CROP[3] - CROP[1]), Image.NEAREST)
            ax = fig.add_subplot(grid[i, 2 * j : 2 * j + 2])
            ax.imshow(np.asarray(crop), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 1:
                ax.set_title(m, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{size} px", fontsize=9)
    fig.suptitle("Forgetting curve: one page rendered once at 1280, read at each mode", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
