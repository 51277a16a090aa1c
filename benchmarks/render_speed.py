"""Pages per second per core: this renderer against Pillow's ImageDraw.text.

Dense 1024x1024 pages (mode base, its default font size) of English prose.
The baseline draws the very same lines (same text, same font file and size,
same positions) with Pillow's ImageDraw.text on a same-size canvas, in the same
process and run. The process is pinned to one CPU with sched_setaffinity and
numpy's thread pools are limited to one thread, so the figures are per core.

    python3 benchmarks/render_speed.py [--pages 12] [--seconds 2] [--cpu 0]

Writes benchmarks/results/render_speed.json.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import json
import sys
import time

import numpy as np
import PIL
from common import RESULTS_DIR, command, cpu_name, write_json
from PIL import Image, ImageDraw, ImageFont

from renderers import RenderConfig, Renderer

RESULTS = RESULTS_DIR / "render_speed.json"
PROSE = (
    "the memory of a conversation fades like ours: recent turns stay sharp while older pages "
    "are kept at lower resolution, cheaper to hold, harder to read. Vision tokens encode "
    "rendered text (about ten times fewer than text tokens) and the decoder reads them back; "
    "kerning, wrapping, AV To Wa yo, 12.5% of 4096 = 512; https://example.org/a/b?c=d"
)


def transcript(n_turns: int, words_per_turn: int) -> list[dict]:
    rng = np.random.default_rng(0)
    words = PROSE.split()
    return [
        {
            "role": ("user", "assistant")[i % 2],
            "content": " ".join(rng.choice(words, words_per_turn)),
        }
        for i in range(n_turns)
    ]


def rate(fn, items, seconds: float) -> float:
    """Items per second: best of three runs, each looping over `items` for about `seconds`."""
    best = 0.0
    for _ in range(3):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for item in items:
                fn(item)
            done += len(items)
        best = max(best, done / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--cpu", type=int, default=0)
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.cpu})

    config = RenderConfig.for_mode("base")
    renderer = Renderer(config)
    messages = transcript(n_turns=args.pages * 2, words_per_turn=700)
    pages = [p for p in renderer.paginate(messages) if p.full][: args.pages]
    chars = [sum(s.end - s.start for s in p.spans) for p in pages]

    font = ImageFont.truetype(
        renderer.fonts.sans.path, config.font_size, layout_engine=ImageFont.Layout.BASIC
    )
    jobs = [renderer.page_lines(messages, p) for p in pages]

    def pillow(lines):
        image = Image.new("L", (config.width, config.height), 255)
        draw = ImageDraw.Draw(image)
        for y, text in lines:
            draw.text((config.margin, y), text, font=font, fill=0, anchor="ls")
        return image.convert("RGB")

    renderer.render(pages[0])  # warm the glyph cache, as a long-lived renderer is
    ours_render = rate(renderer.render, pages, args.seconds)
    baseline = rate(pillow, jobs, args.seconds)
    groups = [messages[2 * i : 2 * i + 2] for i in range(args.pages)]
    per_group_pages = sum(len(renderer.paginate(g)) for g in groups) / len(groups)

    def end_to_end(group):
        for page in renderer.paginate(group):
            renderer.render(page)

    ours_full = rate(end_to_end, groups, args.seconds) * per_group_pages

    result = {
        "machine": {
            "cpu": cpu_name(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "pinned_cpu": args.cpu,
            "threads": 1,
        },
        "command": command("python3 benchmarks/render_speed.py"),
        "page": {
            "mode": config.mode,
            "width": config.width,
            "height": config.height,
            "font_size": config.font_size,
            "pages": len(pages),
            "chars_per_page": round(float(np.mean(chars))),
        },
        "pillow_imagedraw_pages_per_s": round(baseline, 2),
        "render_pages_per_s": round(ours_render, 2),
        "paginate_and_render_pages_per_s": round(ours_full, 2),
        "render_speedup_vs_pillow": round(ours_render / baseline, 2),
        "paginate_and_render_speedup_vs_pillow": round(ours_full / baseline, 2),
        "notes": "Pillow draws pre-broken lines (Layout.BASIC) and does no layout; "
        "'render' draws laid-out pages; 'paginate and render' adds line breaking, "
        "pagination and token counting.",
    }
    write_json(RESULTS, result, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
