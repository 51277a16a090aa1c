"""A rendered transcript on disk: page PNGs and the pages.json manifest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .page import Page
from .renderer import Renderer

MANIFEST = "pages.json"


def write_pages(renderer: Renderer, pages: Sequence[Page], out: str | Path) -> dict[str, Any]:
    """Write page-0001.png ... and pages.json into `out` (created if needed); returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = renderer.config
    entries = []
    for number, page in enumerate(pages, start=1):
        png = renderer.render_png(page)
        name = f"page-{number:04d}.png"
        (out / name).write_bytes(png)
        entries.append(
            {
                "file": name,
                "mode": page.mode,
                "width": page.width,
                "height": page.height,
                "first_turn": page.first_turn,
                "last_turn": page.last_turn,
                "spans": [asdict(s) for s in page.spans],
                "text_tokens": page.text_tokens,
                "vision_tokens": page.vision_tokens,
                "full": page.full,
                "missing_glyphs": page.missing_glyphs,
                "content_hash": page.content_hash,
                "png_sha256": hashlib.sha256(png).hexdigest(),
            }
        )
    manifest = {
        "render_config": {
            "mode": cfg.mode,
            "width": cfg.width,
            "height": cfg.height,
            "font_size": cfg.font_size,
            "line_spacing": cfg.line_spacing,
            "margin": cfg.margin,
            "tab_size": cfg.tab_size,
            "fingerprint": renderer.fingerprint,
        },
        "text_tokenizer": renderer.counter.name,
        "fonts": renderer.fonts.describe(),
        "pages": entries,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
