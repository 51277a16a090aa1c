"""The demo: page, plan and picture a long conversation on the embedded store, no GPU, no weights.

With a model it also encodes the pages in context and answers a question.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from optical_memory.backends import Answer, Backend
from optical_memory.conversation import build_conversation
from optical_memory.memory import OpticalMemory
from optical_memory.messages import load_transcript
from optical_memory.plan import Plan
from optical_memory.stores import Store

DEFAULT_QUESTION = "What is the launch date, and where is the launch party?"
MAX_THUMBNAILS = 160
THUMBNAIL_PX = 320  # wide enough for the grid's largest cells (about 230 px)


@dataclass
class DemoResult:
    session_id: str
    plan: Plan
    pictures: list[Path]
    answer: Answer | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(
    out: str | os.PathLike,
    *,
    transcript: str | os.PathLike | None = None,
    turns: int = 1000,
    store: str | os.PathLike | Store | None = None,
    model: str | os.PathLike | Backend | None = None,
    question: str | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run the demo into directory `out` (the store defaults to `out/memory.sqlite3`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if transcript is not None:
        messages = [m if isinstance(m, dict) else m.to_dict() for m in load_transcript(transcript)]
    else:
        messages = build_conversation(turns)
    mem = OpticalMemory(store if store is not None else out / "memory.sqlite3", model=model)
    # one session per conversation and render configuration: a rerun reuses its pages
    blob = json.dumps([messages, mem.render_config.fingerprint()], ensure_ascii=False)
    session_id = f"demo-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    try:
        ids = [f"{i:07d}" for i in range(len(messages))]
        chunk = 250
        for start in tqdm(range(0, len(messages), chunk), desc="storing turns", unit="batch",
                          disable=not progress):
            batch = slice(start, start + chunk)
            mem.extend(session_id, messages[batch], turn_ids=ids[batch])
        seconds["store"] = time.perf_counter() - t0

        t = time.perf_counter()
        mem.pages(session_id, progress=progress)
        query = question or DEFAULT_QUESTION
        plan = mem.plan(session_id, query=query)
        seconds["page_and_plan"] = time.perf_counter() - t

        t = time.perf_counter()
        pictures = _pictures(mem, plan, out, progress)
        seconds["pictures"] = time.perf_counter() - t

        answer = None
        if model is not None:
            t = time.perf_counter()
            answer = mem.ask(session_id, query, progress=progress)
            plan = mem.plan(session_id, query=query)
            seconds["encode_and_answer"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0
        (out / "plan.json").write_text(plan.to_json(), encoding="utf-8")
        return DemoResult(session_id, plan, pictures, answer, seconds)
    finally:
        mem.close()


def _pictures(mem: OpticalMemory, plan: Plan, out: Path, progress: bool) -> list[Path]:
    from optical_memory.pictures import memory_picture, tokens_by_age

    if not plan.pages:
        return [tokens_by_age(plan, out / "tokens_by_age.png")]
    thumbnails, sample = page_thumbnails(mem, plan, progress)
    return [
        memory_picture(plan, thumbnails, sample, out / "memory.png"),
        tokens_by_age(plan, out / "tokens_by_age.png"),
    ]


def page_thumbnails(
    mem: OpticalMemory, plan: Plan, progress: bool = False
) -> tuple[dict[int, Image.Image], Image.Image]:
    """Thumbnails (THUMBNAIL_PX wide) of up to MAX_THUMBNAILS of the plan's pages, evenly spread,
    by page index; and the newest sealed page at full size (the sample the tiers are shown on)."""
    pages = plan.pages
    step = max(1, -(-len(pages) // MAX_THUMBNAILS))
    thumbnails = {}
    for page in tqdm(pages[::step], desc="rendering pages", unit="page", disable=not progress):
        image = mem.page_image(plan.session_id, page)
        size = (THUMBNAIL_PX, round(THUMBNAIL_PX * image.height / image.width))
        thumbnails[page.index] = image.resize(size, Image.Resampling.BOX)  # area average
    sample = mem.page_image(plan.session_id, next((p for p in pages[::-1] if p.sealed), pages[-1]))
    return thumbnails, sample
