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
from optical_memory.plan import TEXT, Plan

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
TIER_ALPHA = {"text": 1.0, "gundam": 1.0, "large": 0.85, "base": 0.7, "small": 0.55, "tiny": 0.42, "out": 0.12}


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
    """The thumbnail with its ink darkened (a scaled-down page is mostly pale grey strokes),
    then faded towards white by `alpha`: the fading shows between tiers."""
    pixels = (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0) ** 2.5
    return 1.0 - alpha * (1.0 - pixels)


# The grid of pages: cells one unit wide and PITCH_Y high; each frame is FRAME units square at
# (INSET, INSET) in its cell, its label below it, clear of the frame.
INSET, FRAME, PITCH_Y = 0.06, 0.88, 1.22


def memory_picture(
    plan: Plan,
    thumbnails: Mapping[int, Image.Image],
    sample: Image.Image,
    path: str | Path,
) -> Path:
    """Top: one page as each tier resolves it (a zoomed crop). Bottom: every page, oldest first,
    framed and faded by its tier now; pages without a thumbnail are drawn as blocks."""
    path = Path(path)
    fig = memory_figure(plan, thumbnails, sample)
    fig.savefig(path, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def grid_shape(n: int) -> tuple[int, float]:
    """Columns of the grid of `n` pages (and the recent text) and the width of a cell in inches:
    cells of about two inches (thumbnails that show the fading) up to a 22-inch-wide figure."""
    cols = max(5, math.ceil(math.sqrt((n + 1) * 1.4)))
    return cols, min(22.0, max(14.0, cols * 2.1)) / cols


def memory_figure(
    plan: Plan, thumbnails: Mapping[int, Image.Image], sample: Image.Image
) -> plt.Figure:
    """The figure of `memory_picture` (not saved; the caller closes it)."""
    n = len(plan.pages)
    cols, cell_in = grid_shape(n)
    rows = max(1, math.ceil((n + 1) / cols))
    width_in = cols * cell_in
    top_in = width_in / len(FADING_ORDER) * 0.62 * 0.8 + 0.55  # crops of aspect 0.62, titles
    bottom_in = cell_in * rows * PITCH_Y
    legend_in = 0.9
    height = 0.9 + top_in + bottom_in + legend_in
    fig = plt.figure(figsize=(width_in, height), dpi=110)
    grid = fig.add_gridspec(2, 1, height_ratios=[top_in, bottom_in], hspace=0.06,
                            top=1 - 0.9 / height, bottom=legend_in / height, left=0.01, right=0.99)

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
    ax.set_ylim(rows * PITCH_Y, 0)
    ax.set_aspect("equal")
    ax.axis("off")
    label_size = min(8.0, max(4.5, cell_in * 3.6))

    def cell(i: int) -> tuple[float, float]:  # top left corner of the frame of cell i
        return i % cols + INSET, (i // cols) * PITCH_Y + INSET

    for i, page in enumerate(plan.pages):
        tier = page.mode or "out"
        x, y = cell(i)
        thumb = thumbnails.get(page.index)
        if thumb is not None:
            ax.imshow(_fade(thumb, TIER_ALPHA[tier]), extent=(x, x + FRAME, y + FRAME, y),
                      interpolation="antialiased")
        else:
            ax.add_patch(Rectangle((x, y), FRAME, FRAME, color=TIER_COLORS[tier],
                                   alpha=0.25 * TIER_ALPHA[tier] + 0.05))
        ax.add_patch(Rectangle((x, y), FRAME, FRAME, fill=False, edgecolor=TIER_COLORS[tier],
                               linewidth=2.2 if page.mode else 1,
                               linestyle="-" if page.mode else ":", gid="frame"))
        label = f"turns {page.first_turn}-{page.last_turn}, {tier}"
        ax.text(x + FRAME / 2, y + FRAME + 0.06, label, ha="center", va="top",
                fontsize=label_size, color="#444444", gid="label")
    x, y = cell(n)
    ax.add_patch(Rectangle((x, y), FRAME, FRAME, color=TIER_COLORS["text"], alpha=0.12))
    ax.add_patch(Rectangle((x, y), FRAME, FRAME, fill=False, edgecolor=TIER_COLORS["text"],
                           linewidth=2.2, gid="frame"))
    text = f"recent text\n{plan.text_turns} turns\n{plan.text_tokens:,} tokens"
    if plan.pinned:
        turns = f"{len(plan.pinned)} turn" + ("s" if len(plan.pinned) > 1 else "")
        text = f"pinned text\n{turns}, {plan.pinned_tokens:,} tokens\n\n" + text
    ax.text(x + FRAME / 2, y + FRAME / 2, text, ha="center", va="center",
            fontsize=label_size + 1, color=TIER_COLORS["text"])
    counts = {r["tier"]: r["pages"] for r in plan.rows()}
    handles = [
        Patch(facecolor="white", edgecolor=TIER_COLORS[t], linewidth=2, label=f"{t} ({counts[t]})")
        for t in ("text", *FADING_ORDER, "out") if counts.get(t)
    ]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.1 / height),
               ncol=max(1, len(handles)), frameon=False, fontsize=9,
               title="pages by tier now, oldest top left; faded: read at lower resolution; "
               "out: kept in the store, not in the context", title_fontsize=9)
    return fig


def tokens_by_age(plan: Plan, path: str | Path) -> Path:
    """Left: text and vision tokens of every page by age. Right: cumulative tokens from the newest
    turn back, plain text against optical memory, beside the decoder window."""
    path = Path(path)
    fig = tokens_figure(plan)
    fig.savefig(path, facecolor="white")
    plt.close(fig)
    return path


def tokens_figure(plan: Plan) -> plt.Figure:
    """The figure of `tokens_by_age` (not saved; the caller closes it). Each legend sits in
    headroom above the highest bar or line, clear of the data."""
    unit = plan.age_unit
    pages = plan.pages
    ages = np.array([p.age for p in pages], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), dpi=110)

    gaps = np.diff(np.sort(ages))
    width = 0.8 * float(np.median(gaps)) if len(gaps) else 1.0
    left.bar(ages, [p.text_tokens for p in pages], width=width, color="#d9d9d9",
             label="text tokens the page holds")
    left.bar(ages, [p.vision_tokens for p in pages], width=width * 0.6,
             color=[TIER_COLORS[p.mode or "out"] for p in pages],
             label="vision tokens it costs now")
    highest = max([p.text_tokens for p in pages] + [p.vision_tokens for p in pages] + [1])
    left.set_ylim(0, highest * 1.35)
    left.set_xlabel(f"page age ({unit} since its newest turn)")
    left.set_ylabel("tokens per page")
    left.set_title("every page: what it holds and what it costs")
    left.invert_xaxis()
    tier_handles = [Patch(color=TIER_COLORS[t], label=t) for t in (TEXT, *FADING_ORDER)
                    if any(p.mode == t for p in pages)]
    left.legend(handles=[Patch(color="#d9d9d9", label="text tokens held"), *tier_handles],
                fontsize=8, loc="upper center", ncol=3)

    newest_first = sorted((p for p in pages if p.mode != TEXT), key=lambda p: p.age)
    x = [0.0] + [p.age for p in newest_first]
    text = plan.pinned_tokens + plan.text_tokens
    plain = np.cumsum([text] + [p.text_tokens for p in newest_first])
    optical = np.cumsum([text] + [p.vision_tokens for p in newest_first])
    right.step(x, plain, where="post", color="#636363", linewidth=2, label="history as plain text")
    right.step(x, optical, where="post", color=TIER_COLORS["gundam"], linewidth=2.5,
               label="optical memory (pinned and recent text + vision tokens)")
    budget = plan.window - plan.query_tokens - plan.answer_tokens - plan.overhead
    right.axhline(budget, color=TIER_COLORS["text"], linestyle="--", linewidth=1.5,
                  label=f"decoder window less query and answer ({budget:,})")
    right.set_xlabel(f"how far back ({unit})")
    right.set_ylabel("context positions needed")
    right.set_title("how far back the context reaches")
    right.set_ylim(0, max(float(plain[-1]), float(optical[-1]), budget, 1) * 1.3)
    right.legend(fontsize=8, loc="upper left")
    right.grid(alpha=0.3)
    fig.suptitle(f"tokens by age, session {plan.session_id!r}; text tokens by {plan.counter}",
                 fontsize=12)
    fig.tight_layout()
    return fig
