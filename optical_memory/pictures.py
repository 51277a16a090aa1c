"""Pictures of a session's memory (matplotlib): pages by tier fading with age, tokens by age."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch, Rectangle
from PIL import Image

from optical_memory.modes import FADING_ORDER, MODES
from optical_memory.plan import Plan

TIER_COLORS = {
    "gundam": "#1b7837",
    "large": "#5aae61",
    "base": "#2166ac",
    "small": "#9970ab",
    "tiny": "#e08214",
    "out": "#bababa",
    "text": "#b2182b",
}
# How strongly a thumbnail shows, by tier: the faded look of older memory.
TIER_ALPHA = {"gundam": 1.0, "large": 0.85, "base": 0.7, "small": 0.55, "tiny": 0.42, "out": 0.12}


def encoder_detail(image: Image.Image, mode: str) -> Image.Image:
    """The page as much as `mode` resolves it: scaled to the mode's input side and back.

    Gundam reads its local tiles at the canvas' own resolution; the other modes
    see the whole page at their square input size.
    """
    m = MODES[mode]
    side = max(image.size) if m.tiled else m.base_size
    scale = side / max(image.size)
    if scale >= 1:
        return image
    small = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    return small.resize(image.size, Image.BICUBIC)


def _fade(image: Image.Image, alpha: float) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return 1.0 - alpha * (1.0 - pixels)


def memory_picture(
    plan: Plan,
    thumbnails: Mapping[int, Image.Image],
    sample: Image.Image,
    path: str | Path,
) -> Path:
    """Top: one page as each tier resolves it (a zoomed crop). Bottom: every page, oldest first,
    framed and faded by its tier now; pages without a thumbnail are drawn as blocks."""
    path = Path(path)
    n = len(plan.pages)
    cols = max(10, math.ceil(math.sqrt(n * 2.2)))
    rows = max(1, math.ceil((n + 1) / cols))
    width_in = 14.0
    top_in = width_in / len(FADING_ORDER) * 0.62 * 0.8 + 0.55  # crops of aspect 0.62, titles
    bottom_in = width_in / cols * rows
    height = 0.9 + top_in + bottom_in
    fig = plt.figure(figsize=(width_in, height), dpi=110)
    grid = fig.add_gridspec(2, 1, height_ratios=[top_in, bottom_in], hspace=0.05,
                            top=1 - 0.9 / height, bottom=0.0)

    # --- one page at every tier ------------------------------------------------------------
    top = grid[0].subgridspec(1, len(FADING_ORDER), wspace=0.05)
    w, h = sample.size
    crop = (int(w * 0.015), int(h * 0.015), int(w * 0.26), int(h * 0.167))
    for k, mode in enumerate(FADING_ORDER):
        ax = fig.add_subplot(top[k])
        ax.set_anchor("S")
        view = encoder_detail(sample, mode).crop(crop)
        ax.imshow(np.asarray(view), interpolation="lanczos")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(TIER_COLORS[mode])
            spine.set_linewidth(3)
        cost = plan.page_costs[mode]
        ax.set_title(f"{mode}\n{cost} vision tokens a page", color=TIER_COLORS[mode],
                     fontsize=10, fontweight="bold")
    fig.text(0.5, 1 - 0.12 / height, f"optical memory of session {plan.session_id!r}: "
             f"{plan.turns:,} turns, {n} pages, {plan.total:,} of {plan.window:,} positions",
             ha="center", va="top", fontsize=14, fontweight="bold")
    fig.text(0.5, 1 - 0.5 / height, "top: the same page as each tier resolves it (zoomed crop); "
             "older pages are read at lower resolution, for fewer vision tokens", ha="center",
             va="top", fontsize=10, color="#444444")

    # --- the session, oldest page first -------------------------------------------------
    ax = fig.add_subplot(grid[1])
    ax.set_anchor("N")
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_aspect("equal")
    ax.axis("off")
    for i, page in enumerate(plan.pages):
        tier = page.mode or "out"
        x, y = i % cols, i // cols
        thumb = thumbnails.get(page.index)
        if thumb is not None:
            ax.imshow(_fade(thumb, TIER_ALPHA[tier]), extent=(x + 0.06, x + 0.94, y + 0.94, y + 0.06))
        else:
            ax.add_patch(Rectangle((x + 0.06, y + 0.06), 0.88, 0.88, color=TIER_COLORS[tier],
                                   alpha=0.25 * TIER_ALPHA[tier] + 0.05))
        ax.add_patch(Rectangle((x + 0.06, y + 0.06), 0.88, 0.88, fill=False,
                               edgecolor=TIER_COLORS[tier], linewidth=2.2 if page.mode else 1,
                               linestyle="-" if page.mode else ":"))
        ax.text(x + 0.5, y + 1.0, f"turns {page.first_turn}-{page.last_turn}", ha="center",
                va="bottom", fontsize=5.5, color="#555555")
    x, y = n % cols, n // cols
    ax.add_patch(Rectangle((x + 0.06, y + 0.06), 0.88, 0.88, color=TIER_COLORS["text"], alpha=0.12))
    ax.add_patch(Rectangle((x + 0.06, y + 0.06), 0.88, 0.88, fill=False,
                           edgecolor=TIER_COLORS["text"], linewidth=2.2))
    ax.text(x + 0.5, y + 0.5, f"recent text\n{plan.text_turns} turns\n{plan.text_tokens:,} tokens",
            ha="center", va="center", fontsize=7, color=TIER_COLORS["text"])
    counts = {r["tier"]: r["pages"] for r in plan.rows()}
    handles = [
        Patch(facecolor="white", edgecolor=TIER_COLORS[t], linewidth=2, label=f"{t} ({counts[t]})")
        for t in (*FADING_ORDER, "out") if counts.get(t)
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles),
              frameon=False, fontsize=9, title="pages by tier now, oldest top left; out: kept in "
              "the store, not in the context", title_fontsize=9)
    fig.savefig(path, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def tokens_by_age(plan: Plan, path: str | Path) -> Path:
    """Left: text and vision tokens of every page by age. Right: cumulative tokens from the newest
    turn back, plain text against optical memory, beside the decoder window."""
    path = Path(path)
    unit = plan.age_unit
    pages = plan.pages
    ages = np.array([p.age for p in pages], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), dpi=110)

    gaps = np.diff(np.sort(ages))
    width = 0.8 * float(np.median(gaps)) if len(gaps) else 1.0
    left.bar(ages, [p.text_tokens for p in pages], width=width, color="#d9d9d9",
             label="text tokens the page holds")
    left.bar(ages, [p.vision_tokens for p in pages], width=width * 0.6,
             color=[TIER_COLORS[p.mode or "out"] for p in pages], label="vision tokens it costs now")
    left.set_xlabel(f"page age ({unit} since its newest turn)")
    left.set_ylabel("tokens per page")
    left.set_title("every page: what it holds and what it costs")
    left.invert_xaxis()
    tier_handles = [Patch(color=TIER_COLORS[t], label=t) for t in FADING_ORDER
                    if any(p.mode == t for p in pages)]
    left.legend(handles=[Patch(color="#d9d9d9", label="text tokens held"), *tier_handles],
                fontsize=8, loc="upper left")

    newest_first = sorted(pages, key=lambda p: p.age)
    x = [0.0] + [p.age for p in newest_first]
    plain = np.cumsum([plan.text_tokens] + [p.text_tokens for p in newest_first])
    optical = np.cumsum([plan.text_tokens] + [p.vision_tokens for p in newest_first])
    right.step(x, plain, where="post", color="#636363", linewidth=2, label="history as plain text")
    right.step(x, optical, where="post", color=TIER_COLORS["gundam"], linewidth=2.5,
               label="optical memory (recent text + vision tokens)")
    budget = plan.window - plan.query_tokens - plan.answer_tokens - plan.overhead
    right.axhline(budget, color=TIER_COLORS["text"], linestyle="--", linewidth=1.5,
                  label=f"decoder window less query and answer ({budget:,})")
    right.set_xlabel(f"how far back ({unit})")
    right.set_ylabel("context positions needed")
    right.set_title("how far back the context reaches")
    right.legend(fontsize=8, loc="upper left")
    right.grid(alpha=0.3)
    fig.suptitle(f"tokens by age, session {plan.session_id!r}; text tokens by {plan.counter}",
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(path, facecolor="white")
    plt.close(fig)
    return path
