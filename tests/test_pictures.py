"""The demo's pictures, measured on the drawn figures: thumbnails large enough to show the
fading, labels clear of the frames, legends clear of the bars, lines and pages."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.transforms import Bbox
from PIL import Image

from optical_memory.conversation import build_conversation
from optical_memory.demo import page_thumbnails
from optical_memory.memory import OpticalMemory
from optical_memory.pictures import memory_figure, tokens_figure
from optical_memory.policy import Policy


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """The demo's 1000-turn session: its plan and thumbnails."""
    # the fixed schedule spreads the pages over every tier, from gundam to tiny
    mem = OpticalMemory(
        tmp_path_factory.mktemp("pictures") / "m.sqlite3", policy=Policy(planner="schedule")
    )
    mem.extend("s", build_conversation(1000))
    mem.pages("s")
    plan = mem.plan("s", query="When do we launch?")
    thumbnails, sample = page_thumbnails(mem, plan)
    mem.close()
    assert {p.mode for p in plan.pages} >= {"gundam", "tiny"}
    return plan, thumbnails, sample


def _grown(box: Bbox, px: float) -> Bbox:
    return Bbox.from_extents(box.x0 - px, box.y0 - px, box.x1 + px, box.y1 + px)


def _pixels(fig) -> np.ndarray:
    """The figure as saved at its dpi, without cropping: display coordinates are pixels
    (y from the bottom)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    return np.asarray(Image.open(buffer).convert("L"), dtype=np.float32) / 255.0


def test_memory_picture_thumbnails_labels_and_legend(drawn):
    plan, thumbnails, sample = drawn
    fig = memory_figure(plan, thumbnails, sample)
    try:
        pixels = _pixels(fig)  # draws the figure
        renderer = fig.canvas.get_renderer()
        grid = fig.axes[-1]
        frames = [p for p in grid.patches if p.get_gid() == "frame"]
        labels = [t for t in grid.texts if t.get_gid() == "label"]
        assert len(frames) == len(plan.pages) + 1 and len(labels) == len(plan.pages)
        px = 2.2 * fig.dpi / 72  # the frames' line width
        frame_boxes = [_grown(f.get_window_extent(renderer), px) for f in frames]
        label_boxes = [t.get_window_extent(renderer) for t in labels]
        for label, box in zip(labels, label_boxes):
            hit = [i for i, f in enumerate(frame_boxes) if box.overlaps(f)]
            assert not hit, f"label {label.get_text()!r} overlaps frame {hit}"
        legend = fig.legends[0].get_window_extent(renderer)
        assert not any(legend.overlaps(b) for b in frame_boxes + label_boxes)

        # thumbnails about 200 px wide (they were 105), and the fading shows in them
        images = grid.get_images()
        assert len(images) == len(thumbnails)
        widths = [im.get_window_extent(renderer).width for im in images]
        assert min(widths) >= 180, widths
        ink = {}
        height = pixels.shape[0]
        for page, im in zip([p for p in plan.pages if p.index in thumbnails], images):
            box = im.get_window_extent(renderer)
            crop = pixels[round(height - box.y1) : round(height - box.y0),
                          round(box.x0) : round(box.x1)]
            ink.setdefault(page.mode or "out", []).append(float(1.0 - crop.mean()))
        gundam, tiny = np.mean(ink["gundam"]), np.mean(ink["tiny"])
        assert tiny > 0.02, ink  # the oldest pages still show their text
        assert gundam > 1.8 * tiny, ink  # ... visibly fainter than the newest
    finally:
        plt.close(fig)


def test_tokens_picture_legends_clear_of_the_data(drawn):
    plan, _, _ = drawn
    fig = tokens_figure(plan)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        left, right = fig.axes
        legend = left.get_legend().get_window_extent(renderer)
        bars = [p.get_window_extent(renderer) for p in left.patches]
        assert len(bars) == 2 * len(plan.pages)
        assert all(not legend.overlaps(b) for b in bars)
        assert legend.y0 > max(b.y1 for b in bars)  # above the highest bar

        legend = right.get_legend().get_window_extent(renderer)
        highest = max(
            right.transData.transform(line.get_xydata())[:, 1].max() for line in right.lines
        )
        assert legend.y0 > highest  # above every line, the window line included
    finally:
        plt.close(fig)
