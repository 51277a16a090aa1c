"""Helpers shared by the benchmark scripts (`from common import ...`).

The scripts run as `python benchmarks/<script>.py`, which puts this folder on
`sys.path`. Importing this module also puts the repository root there, so the
scripts import `optical_memory` and `renderers` from the working tree without an
install. Torch is imported only by the helpers that use it; render_speed.py
limits numpy's threads before it imports this module, and the reference side of
equivalence_decoder.py imports it in the reference's own Python (with numpy and
Pillow, without this project).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from renderers import FontFile, FontSet, RenderConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------ run records
def command(*head: str, argv: list[str] | None = None, quote: bool = False) -> str:
    """The command line a result records: `head` followed by the arguments (`argv`, by
    default `sys.argv[1:]`), joined with spaces, or shell-quoted when `quote`."""
    words = [*head, *(sys.argv[1:] if argv is None else argv)]
    return shlex.join(words) if quote else " ".join(words)


def write_json(path: str | Path, data: Any, *, indent: int = 1, ensure_ascii: bool = True) -> None:
    """Write `data` as JSON with a final newline, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + "\n")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- GPU
def matmul_peak_tflops(
    seconds_per_call: Callable[[Callable[[], object]], float], n: int = 8192, device: Any = "cuda"
) -> float:
    """bf16 TFLOP/s of an n x n x n matmul; `seconds_per_call(fn)` is the caller's timer."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / seconds_per_call(lambda: a @ b) / 1e12


# ------------------------------------------------------------- DeepSeek-OCR reference
# mode -> (base_size, image_size, crop_mode), as in the reference's config.py (its `infer`)
REFERENCE_MODES = {
    "tiny": (512, 512, False),
    "small": (640, 640, False),
    "base": (1024, 1024, False),
    "large": (1280, 1280, False),
    "gundam": (1024, 640, True),
}


def reference_encoder(ref_dir: Path, tensors: dict) -> tuple[Any, Any, Any, list]:
    """The reference SAM ViT-B, CLIP-L and linear projector (`deepencoder.py` in `ref_dir`) with
    `tensors` (official names) loaded non-strictly: (sam, clip, projector, load results)."""
    if str(ref_dir) not in sys.path:
        sys.path.insert(0, str(ref_dir))
    import deepencoder  # the reference module

    sam = deepencoder.build_sam_vit_b()
    clip = deepencoder.build_clip_l()
    projector = deepencoder.MlpProjector(
        deepencoder.adict(projector_type="linear", input_dim=2048, n_embed=1280)
    )
    loaded = []
    for prefix, module in (
        ("model.sam_model.", sam),
        ("model.vision_model.", clip),
        ("model.projector.", projector),
    ):
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        loaded.append(module.load_state_dict(state, strict=False))
    return sam, clip, projector, loaded


def text_page(
    width: int, height: int, *, margin: int, line_height: int, left: int, box: bool = False
) -> Image.Image:
    """A white page of numbered "quick brown fox" lines (and, with `box`, a red rectangle)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for y in range(margin, height - margin, line_height):
        draw.text(
            (left, y), f"{y:05d} the quick brown fox jumps over the lazy dog " * 3, fill="black"
        )
    if box:
        draw.rectangle((width // 3, height // 3, width // 2, height // 2), outline="red", width=5)
    return image


# ---------------------------------------------------- Tesseract legibility (CER)
# legibility.py chooses each mode's default font size with it, forgetting_curve.py the
# memory page's.
CER_LIMIT = 0.05
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


def require_tesseract() -> None:
    if shutil.which("tesseract") is None:
        sys.exit(
            "tesseract not found: install tesseract-ocr tesseract-ocr-chi-sim "
            "tesseract-ocr-rus tesseract-ocr-ell"
        )


def ocr(image: Image.Image, workdir: str, name: str) -> str:
    """Tesseract's reading of `image` (eng+rus+ell+chi_sim, --psm 6), upscaled 2x with Lanczos."""
    path = os.path.join(workdir, f"{name}.png")
    image.resize((image.width * 2, image.height * 2), Image.LANCZOS).save(path)
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    run = subprocess.run(
        ["tesseract", path, "stdout", "-l", "eng+rus+ell+chi_sim", "--psm", "6"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return run.stdout


def tesseract_version() -> str:
    out = subprocess.run(
        ["tesseract", "--version"], capture_output=True, text=True, check=False
    ).stdout
    return out.splitlines()[0] if out else "unknown"


def render_config(directory: str | None) -> RenderConfig:
    """The memory page config, with the DejaVu fonts of `directory` when given (a machine
    without them installed)."""
    config = RenderConfig.memory_page()
    if not directory:
        return config
    d = Path(directory)
    return replace(
        config,
        fonts=FontSet(
            sans=FontFile(str(d / "DejaVuSans.ttf")),
            mono=FontFile(str(d / "DejaVuSansMono.ttf")),
            label=FontFile(str(d / "DejaVuSans-Bold.ttf")),
            fallbacks=(),
        ),
    )
