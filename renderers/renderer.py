"""Renderer: chat messages into pages (layout) and pages into images (raster)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from optical_memory.messages import IMAGE_SLOT, ImageData, Message, parse_message
from optical_memory.tokens import TokenCounter, default_counter

from .config import RenderConfig
from .glyphs import Glyphs, Style
from .layout import Line, break_paragraph
from .page import Page, PlacedImage, Rule, Span
from .raster import compose, encode_png, ink_to_image

CODE_FENCE = "```"


@dataclass(frozen=True)
class Picture:
    """A message's image laid out as a block of `rows` text rows: characters [start, end)
    of the turn (its IMAGE_SLOT, and the newline after it), drawn width x height pixels.

    An image is scaled down to the text width and to the rows a page has below a turn
    label (so it always fits one page), keeping its aspect ratio; it is never scaled up.
    """

    start: int
    end: int
    rows: int
    width: int
    height: int
    image: ImageData


Block = Line | Picture


LINE_CACHE_PARAGRAPHS = 4096  # paragraphs whose lines a renderer keeps
LINE_CACHE_CHARS = 2000  # longer paragraphs are broken each time (their lines are large)


class TurnTooLongError(ValueError):
    """A turn longer than RenderConfig.max_turn_chars."""


class Renderer:
    """Lays out and draws pages for one RenderConfig; its faces and glyph caches live here."""

    def __init__(self, config: RenderConfig | None = None, counter: TokenCounter | None = None):
        self.config = config if config is not None else RenderConfig.for_mode("base")
        self.counter = counter if counter is not None else default_counter()
        self.fonts = self.config.resolved_fonts()
        self.fingerprint = self.config.fingerprint()
        self.glyphs = Glyphs(self.fonts, self.config.font_size, self.config.tab_size)
        self._rule_thickness = max(1, round(self.config.font_size / 12))
        # A paragraph breaks into the same lines wherever it sits (only the turn offsets of
        # its lines move): memory lays the open page out again as turns arrive, so the lines
        # of recent paragraphs are kept (lru_cache is safe to share between threads).
        self._lines = lru_cache(maxsize=LINE_CACHE_PARAGRAPHS)(self._paragraph_lines)

    def paginate(
        self,
        messages: Sequence[Message | Mapping[str, object]],
        start: tuple[int, int] = (0, 0),
    ) -> list[Page]:
        """Pages holding messages[start[0]:], beginning at character start[1] of that turn.

        Every character from `start` on belongs to exactly one page's spans. The
        last page has `full` False unless it was closed because a line did not fit.
        """
        msgs = [parse_message(m, f"message {i}") for i, m in enumerate(messages)]
        first_turn, first_offset = start
        if not 0 <= first_turn <= len(msgs):
            raise ValueError(f"start turn {first_turn} is outside 0..{len(msgs)}")
        if first_turn < len(msgs) and not 0 <= first_offset <= len(msgs[first_turn].text):
            raise ValueError(f"start offset {first_offset} is outside turn {first_turn}")
        pages = _PageBuilder(self, msgs)
        for turn in range(first_turn, len(msgs)):
            content = msgs[turn].text
            if len(content) > self.config.max_turn_chars:
                raise TurnTooLongError(
                    f"message {turn} has {len(content):,} characters, more than "
                    f"max_turn_chars={self.config.max_turn_chars:,} of the render config"
                )
            offset = first_offset if turn == first_turn else 0
            lines = self._content_lines(content, offset, image_slots(msgs[turn]))
            pages.add_turn(turn, offset, lines)
        return pages.finish()

    def render(self, page: Page) -> Image.Image:
        """The page as an RGB image of the config's width x height; same page, same pixels."""
        if page.fingerprint != self.fingerprint:
            raise ValueError("page was laid out with a different render config or fonts")
        ink = compose(
            self.glyphs,
            page.glyph_x,
            page.glyph_y,
            page.glyph_keys,
            page.rules,
            page.width,
            page.height,
            self._rule_thickness,
        )
        image = ink_to_image(ink)
        for placed in page.images:
            picture = placed.image.open()
            if picture.size != (placed.width, placed.height):
                picture = picture.resize((placed.width, placed.height), Image.Resampling.LANCZOS)
            image.paste(picture, (placed.x, placed.y))
        return image

    def render_png(self, page: Page) -> bytes:
        """PNG bytes of render(page): deterministic (no metadata, fixed compression)."""
        return encode_png(self.render(page))

    def page_lines(
        self, messages: Sequence[Message | Mapping[str, object]], page: Page
    ) -> list[tuple[int, str]]:
        """(baseline y, text) of every line drawn on `page`, role labels included.

        `messages` are those the page was paginated from; newlines and images are
        not drawn as glyphs and are left out, so each text has one character per glyph.
        """
        parts = []
        for span in page.spans:
            message = parse_message(messages[span.turn], f"message {span.turn}")
            parts.append(turn_label(message.role, span.start > 0, message.label_detail))
            text = message.text[span.start : span.end]
            for slot in reversed(message.image_slots):
                if span.start <= slot < span.end:
                    text = text[: slot - span.start] + text[slot - span.start + 1 :]
            parts.append(text.replace("\n", ""))
        text = "".join(parts)
        ys, counts = np.unique(page.glyph_y, return_counts=True)
        if counts.sum() != len(text):
            raise ValueError("page was not paginated from these messages")
        bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        return [(int(y), text[bounds[i] : bounds[i + 1]]) for i, y in enumerate(ys.tolist())]

    def header(self, role: str, continued: bool, detail: str = "") -> tuple[Line, int]:
        """The role label line of a turn and the x (pixels from the margin) where its rule starts."""
        label = turn_label(role, continued, detail)
        line = self._lines(Style.LABEL, label, 1 << 24, False)[0]
        width = 0
        if len(line.keys):
            width = (int(line.x[-1]) + self.glyphs.ink(int(line.keys[-1])).advance + 63) // 64
        return line, width + self.config.font_size // 2

    def _content_lines(
        self, content: str, offset: int, images: dict[int, ImageData] | None = None
    ) -> Iterator[tuple[Block, bool]]:
        """(line, is_code) for content[offset:]; fenced code blocks are set in the mono face.

        `images` maps the offsets of image slots (each a paragraph of its own) to their
        images: those paragraphs become pictures.
        """
        in_code = sum(_is_fence(p) for p in content[:offset].split("\n")[:-1]) % 2 == 1
        width = self.config.text_width
        position = offset
        paragraphs = content[offset:].split("\n")
        for i, paragraph in enumerate(paragraphs):
            last = i == len(paragraphs) - 1
            if last and not paragraph:
                break
            if images and position in images and paragraph == IMAGE_SLOT:
                yield self.picture(images[position], position, not last), False
                position += 2
                continue
            fence = (
                _is_fence(paragraph) if position == 0 or content[position - 1] == "\n" else False
            )
            style = Style.MONO if in_code or fence else Style.TEXT
            lines = (
                self._lines(style, paragraph, width, not last)
                if len(paragraph) <= LINE_CACHE_CHARS
                else self._paragraph_lines(style, paragraph, width, not last)
            )
            for line in lines:
                yield replace(line, start=line.start + position, end=line.end + position), (
                    style is Style.MONO
                )
            in_code ^= fence
            position += len(paragraph) + 1

    def _paragraph_lines(
        self, style: Style, paragraph: str, width: int, newline: bool
    ) -> tuple[Line, ...]:
        """The lines of a paragraph at turn offset 0."""
        return tuple(break_paragraph(self.glyphs, style, paragraph, 0, width, newline))

    def picture(self, image: ImageData, start: int, newline: bool) -> Picture:
        """The block an image takes at turn offset `start` (see `Picture` for its scale)."""
        cfg = self.config
        max_height = (cfg.lines_per_page - 1) * cfg.line_height
        scale = min(1.0, cfg.text_width / image.width, max_height / image.height)
        width = max(1, min(cfg.text_width, round(image.width * scale)))
        height = max(1, min(max_height, round(image.height * scale)))
        rows = -(-height // cfg.line_height)
        return Picture(start, start + 1 + int(newline), rows, width, height, image)


def image_slots(message: Message) -> dict[int, ImageData]:
    """Offset of each image slot in the message's render text -> its image."""
    slots = message.image_slots
    return dict(zip(slots, message.images())) if slots else {}


def turn_label(role: str, continued: bool, detail: str = "") -> str:
    """The label drawn at the start of a turn (and again on each page it continues to):
    the role, the message's name or tool call id if it has one, e.g. "TOOL (call_1)"."""
    label = role.upper() + (f" ({detail})" if detail else "")
    return label + (" (continued)" if continued else "")


def _is_fence(paragraph: str) -> bool:
    return paragraph.lstrip().startswith(CODE_FENCE)


class _PageBuilder:
    """Fills pages row by row: a role label line per turn (again on each page it continues to)."""

    def __init__(self, renderer: Renderer, messages: list[Message]) -> None:
        self.r = renderer
        self.cfg = renderer.config
        self.messages = messages
        self.pages: list[Page] = []
        self._reset()

    def _reset(self) -> None:
        self.row = 0
        self.spans: list[list[int]] = []  # [turn, start, end]
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        self.rules: list[Rule] = []
        self.images: list[PlacedImage] = []
        self.missing = 0

    def add_turn(self, turn: int, offset: int, lines: Iterator[tuple[Block, bool]]) -> None:
        first = next(lines, None)
        if self.cfg.lines_per_page - self.row < (1 if first is None else 1 + _rows(first[0])):
            self._seal(full=True)
        self._header(turn, offset, continued=offset > 0)
        if first is None:
            return
        self._place(first[0])
        for line, _ in lines:
            if self.row + _rows(line) > self.cfg.lines_per_page:
                self._seal(full=True)
                self._header(turn, line.start, continued=True)
            self._place(line)

    def finish(self) -> list[Page]:
        if self.spans:
            self._seal(full=False)
        return self.pages

    def _baseline(self) -> int:
        return self.cfg.margin + self.r.glyphs.ascent + self.row * self.cfg.line_height

    def _header(self, turn: int, offset: int, continued: bool) -> None:
        message = self.messages[turn]
        line, rule_x = self.r.header(message.role, continued, message.label_detail)
        y = self._baseline() - self.r.glyphs.x_height // 2
        x0, x1 = self.cfg.margin + rule_x, self.cfg.width - self.cfg.margin
        if x1 > x0:
            self.rules.append(Rule(y, x0, x1))
        self._draw(line)
        self.spans.append([turn, offset, offset])

    def _place(self, line: Block) -> None:
        if isinstance(line, Picture):
            # centred in its rows, clear of the descenders above and the ascenders below
            top = self.cfg.margin + self.row * self.cfg.line_height
            y = top + (line.rows * self.cfg.line_height - line.height) // 2
            self.images.append(PlacedImage(self.cfg.margin, y, line.width, line.height, line.image))
            self.row += line.rows
            self.spans[-1][2] = line.end
            return
        self._draw(line)
        self.missing += line.missing
        self.spans[-1][2] = line.end

    def _draw(self, line: Line) -> None:
        self.xs.append((self.cfg.margin + ((line.x + 32) >> 6)).astype(np.int32))
        self.ys.append(np.full(len(line.keys), self._baseline(), dtype=np.int32))
        self.keys.append(line.keys)
        self.row += 1

    def _seal(self, full: bool) -> None:
        spans = tuple(Span(t, s, e) for t, s, e in self.spans)
        texts = [_hashed(self.messages[s.turn], s) for s in spans]
        last = spans[-1]
        next_start = (
            (last.turn + 1, 0)
            if last.end == len(self.messages[last.turn].text)
            else (last.turn, last.end)
        )
        blob = json.dumps([self.r.fingerprint, texts], ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
        self.pages.append(
            Page(
                mode=self.cfg.mode,
                width=self.cfg.width,
                height=self.cfg.height,
                spans=spans,
                text_tokens=sum(self.r.counter.count(entry[2]) for entry in texts),
                vision_tokens=self.cfg.vision_tokens,
                full=full,
                content_hash=hashlib.sha256(blob).hexdigest(),
                missing_glyphs=self.missing,
                next_start=next_start,
                fingerprint=self.r.fingerprint,
                glyph_x=np.concatenate(self.xs) if self.xs else np.zeros(0, np.int32),
                glyph_y=np.concatenate(self.ys) if self.ys else np.zeros(0, np.int32),
                glyph_keys=np.concatenate(self.keys) if self.keys else np.zeros(0, np.int64),
                rules=tuple(self.rules),
                images=tuple(self.images),
            )
        )
        self._reset()


def _rows(block: Block) -> int:
    return block.rows if isinstance(block, Picture) else 1


def _hashed(message: Message, span: Span) -> list[Any]:
    """What a span contributes to its page's content hash: role, whether it continues its
    turn, its text; and for a message with a label detail or images in the span, those (the
    images by the sha256 of their bytes). A plain message's entry is as it always was."""
    entry: list[Any] = [message.role, span.start > 0, message.text[span.start : span.end]]
    images = [
        image.sha256 for at, image in image_slots(message).items() if span.start <= at < span.end
    ]
    if message.label_detail or images:
        entry.append({"label": message.label_detail, "images": images})
    return entry
