"""Legibility of rendered pages: Tesseract character error rate per mode and font size.

A fixed multilingual transcript (English, Russian, Greek, Chinese, code; built
here from a seeded generator) is paginated at each mode's geometry and several
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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from optical_memory.tokens import default_counter
from renderers import RenderConfig, Renderer

RESULTS = Path(__file__).parent / "results" / "legibility.json"
SIZES = {
    "tiny": (10, 12),
    "small": (11, 13),
    "base": (12, 14, 16),
    "large": (16, 18, 20),
}
# The default per mode is the smallest measured size with CER <= CER_LIMIT, and at
# least MIN_SIZE: at 1280 the default keeps 18 px, the lowest CER measured there
# (memory pages have their own density, chosen by forgetting_curve.py).
CER_LIMIT = 0.05
MIN_SIZE = {"large": 18}
SENTENCES = {
    "en": [
        "The committee approved the budget after a long debate about priorities.",
        "Please send the quarterly report to the finance team by Friday.",
        "Our measurements show that the new cache halves the median latency.",
        "She walked along the river and counted the boats moored by the bridge.",
        "Remember to rotate the credentials before the audit next month.",
    ],
    "ru": [
        "Команда обсудила план работ на следующую неделю и утвердила сроки.",
        "Пожалуйста, проверьте результаты измерений перед отправкой отчёта.",
        "Вечером мы гуляли по набережной и говорили о новых проектах.",
    ],
    "el": [
        "Η ομάδα συζήτησε το σχέδιο εργασιών για την επόμενη εβδομάδα.",
        "Παρακαλώ ελέγξτε τα αποτελέσματα πριν από την αποστολή της αναφοράς.",
        "Το απόγευμα περπατήσαμε δίπλα στη θάλασσα και μιλήσαμε για το μέλλον.",
    ],
    "zh": [
        "团队讨论了下周的工作计划并确定了时间表。",
        "请在发送报告之前检查测量结果。",
        "晚上我们沿着河边散步，谈论新的项目。",
    ],
}
CODE = [
    "def moving_average(values, window):",
    "    total = sum(values[:window])",
    "    for i in range(window, len(values)):",
    "        yield total / window",
    "        total += values[i] - values[i - window]",
]


def transcript(n_turns: int = 24) -> list[dict]:
    """A deterministic multilingual conversation: prose in four languages and a code block."""
    rng = np.random.default_rng(2024)
    langs = list(SENTENCES)
    turns = []
    for i in range(n_turns):
        parts = []
        for lang in rng.permutation(langs):
            picks = rng.choice(SENTENCES[lang], size=2, replace=False)
            parts.append(" ".join(picks))
        if i % 3 == 2:
            parts.append("```python\n" + "\n".join(CODE) + "\n```")
        turns.append({"role": ("user", "assistant")[i % 2], "content": "\n".join(parts)})
    return turns


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate with whitespace removed; Levenshtein by rows, vectorised."""
    a = [c for c in reference if not c.isspace()]
    b = np.array([ord(c) for c in hypothesis if not c.isspace()], dtype=np.int64)
    if not a:
        return float(len(b) > 0)
    prev = np.arange(len(b) + 1, dtype=np.int64)
    offsets = np.arange(len(b) + 1, dtype=np.int64)
    for i, ch in enumerate(a, start=1):
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (b != ord(ch)))
        cur = np.minimum.accumulate(cur - offsets) + offsets  # insertions along the row
        prev = cur
    return float(prev[-1]) / len(a)


def ocr(image: Image.Image, workdir: str, name: str) -> str:
    path = os.path.join(workdir, f"{name}.png")
    image.resize((image.width * 2, image.height * 2), Image.LANCZOS).save(path)
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    run = subprocess.run(
        ["tesseract", path, "stdout", "-l", "eng+rus+ell+chi_sim", "--psm", "6"],
        capture_output=True, text=True, env=env, check=True,
    )
    return run.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="Tesseract processes at once")
    args = ap.parse_args()
    if shutil.which("tesseract") is None:
        sys.exit("tesseract not found: install tesseract-ocr tesseract-ocr-chi-sim tesseract-ocr-rus tesseract-ocr-ell")
    messages = transcript()
    counter = default_counter()
    cases = []
    for mode, sizes in SIZES.items():
        for size in sizes:
            config = RenderConfig.for_mode(mode, font_size=size, margin=RenderConfig.for_mode(mode).margin)
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
        rows.append({
            "mode": mode,
            "font_size": size,
            "width": config.width,
            "height": config.height,
            "lines_per_page": config.lines_per_page,
            "text_tokens_per_page": page.text_tokens,
            "vision_tokens": page.vision_tokens,
            "compression": round(page.text_tokens / page.vision_tokens, 2),
            "cer": round(cer(reference, text), 4),
        })
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    defaults = {m: RenderConfig.for_mode(m).font_size for m in ("tiny", "small", "base", "large", "gundam")}
    chosen = {}
    for mode, sizes in SIZES.items():
        ok = [r["font_size"] for r in rows if r["mode"] == mode and r["cer"] <= CER_LIMIT
              and r["font_size"] >= MIN_SIZE.get(mode, 0)]
        chosen[mode] = min(ok) if ok else max(sizes)
    chosen["gundam"] = chosen["large"]
    result = {
        "machine": {"cpu": _cpu_name(), "tesseract": _tesseract_version()},
        "command": " ".join(["python3 benchmarks/legibility.py", *sys.argv[1:]]),
        "ocr": "tesseract -l eng+rus+ell+chi_sim --psm 6 on the page upscaled 2x (Lanczos)",
        "text_tokenizer": counter.name,
        "ocr_seconds": round(time.perf_counter() - started, 1),
        "rule": f"smallest size with CER <= {CER_LIMIT}, at least {MIN_SIZE} px",
        "chosen_font_size": chosen,
        "config_default_font_size": defaults,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if chosen != defaults:
        print(f"note: RenderConfig defaults {defaults} differ from the measured choice {chosen}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _tesseract_version() -> str:
    out = subprocess.run(["tesseract", "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else "unknown"


if __name__ == "__main__":
    main()
