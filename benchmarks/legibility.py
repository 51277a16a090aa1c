"""Legibility of rendered pages: Tesseract character error rate per mode and font size.

A fixed multilingual transcript (English, Russian, Greek, Chinese, code; built
in common.py from a seeded generator) is paginated at each mode's geometry and several
font sizes; the first full page of each is read back with Tesseract
(eng+rus+ell+chi_sim, --psm 6, the page upscaled 2x with Lanczos because
Tesseract is tuned for 300 dpi scans) and compared with the page's text.
CER = edit distance / reference length, whitespace removed on both sides
(Tesseract's spacing of CJK is arbitrary). Each row also gives the text tokens
per page (tiktoken cl100k_base estimate) and the text/vision token ratio.
Gundam pages share Large's 1280x1280 canvas, so Large's rows hold for both.

    python3 benchmarks/legibility.py [--jobs 2]

Writes benchmarks/results/legibility.json. Needs the tesseract-ocr package with
the chi-sim, rus and ell language data.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

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

from optical_memory.tokens import default_counter
from renderers import RenderConfig, Renderer

RESULTS = RESULTS_DIR / "legibility.json"
SIZES = {
    "tiny": (10, 12),
    "small": (11, 13),
    "base": (12, 14, 16),
    "large": (16, 18, 20),
}
# The default per mode is the smallest measured size with CER <= CER_LIMIT, and at
# least MIN_SIZE: at 1280 the default keeps 18 px, the lowest CER measured there
# (memory pages have their own density, chosen by forgetting_curve.py).
MIN_SIZE = {"large": 18}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="Tesseract processes at once")
    args = ap.parse_args()
    require_tesseract()
    messages = transcript()
    counter = default_counter()
    cases = []
    for mode, sizes in SIZES.items():
        for size in sizes:
            config = RenderConfig.for_mode(
                mode, font_size=size, margin=RenderConfig.for_mode(mode).margin
            )
            renderer = Renderer(config, counter)
            pages = renderer.paginate(messages)
            page = next((p for p in pages if p.full), pages[0])
            reference = "\n".join(text for _, text in renderer.page_lines(messages, page))
            cases.append((mode, size, config, page, renderer.render(page), reference))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(args.jobs) as pool:
        texts = list(pool.map(lambda c: ocr(c[4], workdir, f"{c[0]}-{c[1]}"), cases))
    rows = []
    for (mode, size, config, page, _, reference), text in zip(cases, texts):
        rows.append(
            {
                "mode": mode,
                "font_size": size,
                "width": config.width,
                "height": config.height,
                "lines_per_page": config.lines_per_page,
                "text_tokens_per_page": page.text_tokens,
                "vision_tokens": page.vision_tokens,
                "compression": round(page.text_tokens / page.vision_tokens, 2),
                "cer": round(cer(reference, text), 4),
            }
        )
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    defaults = {
        m: RenderConfig.for_mode(m).font_size for m in ("tiny", "small", "base", "large", "gundam")
    }
    chosen = {}
    for mode, sizes in SIZES.items():
        ok = [
            r["font_size"]
            for r in rows
            if r["mode"] == mode
            and r["cer"] <= CER_LIMIT
            and r["font_size"] >= MIN_SIZE.get(mode, 0)
        ]
        chosen[mode] = min(ok) if ok else max(sizes)
    chosen["gundam"] = chosen["large"]
    result = {
        "machine": {"cpu": cpu_name(), "tesseract": tesseract_version()},
        "command": command("python3 benchmarks/legibility.py"),
        "ocr": "tesseract -l eng+rus+ell+chi_sim --psm 6 on the page upscaled 2x (Lanczos)",
        "text_tokenizer": counter.name,
        "ocr_seconds": round(time.perf_counter() - started, 1),
        "rule": f"smallest size with CER <= {CER_LIMIT}, at least {MIN_SIZE} px",
        "chosen_font_size": chosen,
        "config_default_font_size": defaults,
        "rows": rows,
    }
    write_json(RESULTS, result, indent=2, ensure_ascii=False)
    if chosen != defaults:
        print(f"note: RenderConfig defaults {defaults} differ from the measured choice {chosen}")


if __name__ == "__main__":
    main()
