"""Renderer tests on real pixels: ink where text is, none in the margins, every character once."""

import hashlib
import string
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from optical_memory.modes import get_mode
from renderers import Page, RenderConfig, RenderConfigError, Renderer, TurnTooLongError
from renderers.glyphs import NOTDEF_KEY, SLOT_SHIFT, Style


@pytest.fixture(scope="module")
def tiny() -> Renderer:
    return Renderer(RenderConfig.for_mode("tiny"))


def ink(image) -> np.ndarray:
    """[h, w] ink amount 0..255 from an RGB page (white paper)."""
    return 255 - np.asarray(image.convert("L"), dtype=np.int32)


def dense_transcript(n_turns: int = 6) -> list[dict]:
    rng = np.random.default_rng(7)
    words = ["memory", "vision", "Привет", "κόσμε", "世界你好吗", "tokens,", "page.", "\tindented"]
    turns = []
    for t in range(n_turns):
        body = " ".join(rng.choice(words, size=120 + 40 * t))
        body += " " + "QmFzZTY0" * 40  # a token wider than the line: hard breaks
        body += "\n```python\ndef f(x):\n    return x  # code\n```\n" + "末尾。" * 30
        turns.append({"role": ("user", "assistant")[t % 2], "content": body})
    return turns


def coverage(pages: list[Page], messages: list[dict], first=(0, 0)) -> None:
    """Spans cover each turn from `first` on, every character exactly once, in order."""
    expect_turn, expect_pos = first
    for page in pages:
        for span in page.spans:
            if span.turn != expect_turn:
                assert expect_pos == len(messages[expect_turn]["content"])
                assert span.turn == expect_turn + 1 and span.start == 0
                expect_turn, expect_pos = span.turn, 0
            assert span.start == expect_pos, (span, expect_pos)
            assert span.end >= span.start
            expect_pos = span.end
    assert expect_turn == len(messages) - 1
    assert expect_pos == len(messages[-1]["content"])


def test_text_is_inked_where_it_is_laid_out(tiny):
    page = tiny.paginate([{"role": "user", "content": "HELLO"}])[0]
    img = ink(tiny.render(page))
    cfg = tiny.config
    m, lh = cfg.margin, cfg.line_height
    content_row = img[m + lh : m + 2 * lh]  # row 0 is the role label, row 1 the content
    cols = np.flatnonzero(content_row.max(axis=0) > 128)
    assert cols.min() <= m + 2  # starts at the left margin
    assert cols.max() < m + 5 * cfg.font_size  # five capitals wide, not more
    assert img[m : m + lh].max() > 128  # the role label
    assert img[m + 2 * lh :].max() == 0  # nothing below the last line


def test_no_ink_in_margins_and_every_character_once(tiny):
    messages = dense_transcript()
    pages = tiny.paginate(messages)
    assert len(pages) > 3
    assert all(p.full for p in pages[:-1]) and not pages[-1].full
    coverage(pages, messages)
    band = tiny.config.margin // 2
    for page in pages:
        img = ink(tiny.render(page))
        assert img.shape == (512, 512)
        assert img[:band].max() == 0 and img[-band:].max() == 0
        assert img[:, :band].max() == 0 and img[:, -band:].max() == 0
        if page.full:
            assert img.sum() > 0.05 * 255 * img.size  # dense pages carry real ink


def test_continuing_from_a_sealed_page_gives_the_same_pages(tiny):
    messages = dense_transcript(4)
    pages = tiny.paginate(messages)
    resumed = tiny.paginate(messages, start=pages[2].next_start)
    assert [p.content_hash for p in resumed] == [p.content_hash for p in pages[3:]]
    coverage(resumed, messages, first=pages[2].next_start)
    assert tiny.render_png(resumed[0]) == tiny.render_png(pages[3])


def test_turn_labels_repeat_on_continued_pages(tiny):
    pages = tiny.paginate([{"role": "user", "content": "word " * 3000}])
    assert len(pages) > 1
    assert pages[1].spans[0].start > 0  # the turn continues
    assert ink(tiny.render(pages[1]))[: tiny.config.margin + tiny.config.line_height].max() > 128


def test_png_bytes_are_deterministic_across_renderers():
    messages = dense_transcript(2)
    a = Renderer(RenderConfig.for_mode("tiny"))
    b = Renderer(RenderConfig.for_mode("tiny"))
    pa, pb = a.paginate(messages), b.paginate(messages)
    assert [p.content_hash for p in pa] == [p.content_hash for p in pb]
    assert [a.render_png(p) for p in pa] == [b.render_png(p) for p in pb]
    other = a.paginate(
        [{**messages[0], "content": messages[0]["content"].replace("memory", "memorx")}]
    )
    assert other[0].content_hash != pa[0].content_hash
    assert a.render_png(other[0]) != a.render_png(pa[0])


def test_scripts_render_without_missing_glyphs(tiny):
    text = "Привет, мир. Γειά σου κόσμε. 你好，世界。日本語 한국어 Ünïcödé ½ → ∑"
    page = tiny.paginate([{"role": "user", "content": text}])[0]
    assert page.missing_glyphs == 0
    assert NOTDEF_KEY not in page.glyph_keys.tolist()
    slots = set((page.glyph_keys >> SLOT_SHIFT).tolist())
    assert len(slots - {Style.TEXT, Style.LABEL}) >= 1  # CJK came from a fallback face
    assert ink(tiny.render(page)).max() > 200


def test_missing_glyph_is_drawn_and_counted(tiny):
    blank = tiny.paginate([{"role": "user", "content": "a b"}])[0]
    page = tiny.paginate([{"role": "user", "content": "a \U0010fffd\U0010fffd b"}])[0]
    assert page.missing_glyphs == 2
    assert (page.glyph_keys == NOTDEF_KEY).sum() == 2
    assert ink(tiny.render(page)).sum() > ink(tiny.render(blank)).sum()  # the boxes are visible


def test_control_characters_are_visible(tiny):
    plain = tiny.paginate([{"role": "user", "content": "ab"}])[0]
    ctrl = tiny.paginate([{"role": "user", "content": "a\x00\x1b\x7f\x85b"}])[0]
    assert ctrl.missing_glyphs == 0
    assert ctrl.spans[0].end == 6
    assert ink(tiny.render(ctrl)).sum() > ink(tiny.render(plain)).sum() + 4 * 255


def test_hostile_unicode_never_crashes(tiny):
    text = (
        "e\u0301\u0302\u0303 " * 50
        + "👩\u200d👩\u200d👧 🏳️\u200d🌈 "
        + "שלום עולם مرحبا \u202eevil\u202c \u200b\ufeff\u2028\u2029 "
        + "\u0300" * 20
    )
    messages = [{"role": "tool", "content": text}, {"role": "developer", "content": ""}]
    pages = tiny.paginate(messages)
    coverage(pages, messages)
    for page in pages:
        tiny.render(page)


def test_empty_content_is_an_empty_turn(tiny):
    messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    pages = tiny.paginate(messages)
    assert len(pages) == 1
    assert [(s.turn, s.start, s.end) for s in pages[0].spans] == [(0, 0, 0), (1, 0, 0)]
    assert pages[0].text_tokens == 0


def test_code_fences_use_the_mono_face(tiny):
    page = tiny.paginate([{"role": "user", "content": "prose\n```\ncode line\n```\nprose"}])[0]
    slots = (page.glyph_keys >> SLOT_SHIFT).tolist()
    assert Style.MONO in slots and Style.TEXT in slots


def test_five_megabyte_message_paginates(tiny):
    text = ("lorem ipsum dolor sit amet Привет 世界 " * 140_000)[:5_000_000]
    messages = [{"role": "user", "content": text}]
    pages = tiny.paginate(messages)
    coverage(pages, messages)
    assert sum(p.text_tokens for p in pages) > 1_000_000


def test_turn_size_limit_is_a_clear_error():
    renderer = Renderer(RenderConfig.for_mode("tiny", max_turn_chars=100))
    with pytest.raises(TurnTooLongError, match="message 1 has 101 characters"):
        renderer.paginate(
            [{"role": "user", "content": "x"}, {"role": "user", "content": "y" * 101}]
        )


def test_page_records_tokens_and_hash(tiny):
    page = tiny.paginate([{"role": "user", "content": "hello world"}])[0]
    assert page.text_tokens == 2
    assert page.vision_tokens == get_mode("tiny").vision_tokens() == 73
    assert len(page.content_hash) == 64 and int(page.content_hash, 16) >= 0
    assert (page.first_turn, page.last_turn, page.next_start) == (0, 0, (1, 0))


def test_geometry_is_the_encoder_native_size():
    for mode, side in [
        ("tiny", 512),
        ("small", 640),
        ("base", 1024),
        ("large", 1280),
        ("gundam", 1280),
    ]:
        cfg = RenderConfig.for_mode(mode)
        assert (cfg.width, cfg.height) == (side, side)
    tall = RenderConfig.for_mode("gundam", height=1920)
    assert tall.vision_tokens == get_mode("gundam").vision_tokens(1280, 1920)
    with pytest.raises(RenderConfigError, match="multiple of 640"):
        RenderConfig.for_mode("gundam", width=1000)
    with pytest.raises(RenderConfigError, match="base pages are 1024x1024"):
        RenderConfig.for_mode("base", width=1280, height=1280)


def test_fingerprint_covers_config_and_fonts():
    a, b = RenderConfig.for_mode("base"), RenderConfig.for_mode("base")
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != RenderConfig.for_mode("base", font_size=17).fingerprint()
    fonts = a.resolved_fonts()
    assert all(len(f["sha256"]) == 64 for f in fonts.describe())
    with open(fonts.sans.path, "rb") as fh:
        assert fonts.describe()[0]["sha256"] == hashlib.sha256(fh.read()).hexdigest()


def test_page_from_another_config_is_refused(tiny):
    page = tiny.paginate([{"role": "user", "content": "x"}])[0]
    with pytest.raises(ValueError, match="different render config"):
        Renderer(RenderConfig.for_mode("tiny", font_size=14)).render(page)


def test_page_lines_give_the_drawn_text(tiny):
    messages = [
        {"role": "user", "content": "hello world\nsecond line"},
        {"role": "assistant", "content": ""},
    ]
    page = tiny.paginate(messages)[0]
    assert [text for _, text in tiny.page_lines(messages, page)] == [
        "USER",
        "hello world",
        "second line",
        "ASSISTANT",
    ]


def test_one_renderer_serves_many_threads_alike():
    """Threads share a renderer (a server's memory does): with its glyph caches cold, pages
    laid out and drawn from 8 threads at once equal those of one thread."""
    chars = string.ascii_letters + string.digits + "éüßøñçåæœ" + "记忆压缩页面" + "памятьстраница"
    messages = [
        {"role": ("user", "assistant")[i % 2],
         "content": " ".join(chars[(i * 7 + j) % len(chars)] * (1 + j % 5) for j in range(60))}
        for i in range(24)
    ]
    config = RenderConfig.for_mode("base")
    alone = Renderer(config)
    expected = [alone.render(page).tobytes() for page in alone.paginate(messages)]
    shared = Renderer(config)

    def draw(_: int) -> list[bytes]:
        return [shared.render(page).tobytes() for page in shared.paginate(messages)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(draw, range(16)))
    assert all(r == expected for r in results)


def test_lines_kept_between_layouts_change_no_page():
    """A renderer keeps the lines of the paragraphs it broke: laying the same turns out again,
    from a turn's middle too, gives the pages a fresh renderer gives."""
    messages = [
        {"role": ("user", "assistant")[i % 2],
         "content": f"Paragraph {i} about the launch plan.\n" + "word " * (20 + 7 * i)}
        for i in range(12)
    ]
    config = RenderConfig.for_mode("base")
    warm = Renderer(config)
    warm.paginate(messages)
    for start in ((0, 0), (3, 17)):
        fresh = Renderer(config).paginate(messages, start=start)
        again = warm.paginate(messages, start=start)
        assert [p.content_hash for p in again] == [p.content_hash for p in fresh]
        assert all(
            np.array_equal(a.glyph_x, b.glyph_x) and np.array_equal(a.glyph_y, b.glyph_y)
            and a.spans == b.spans
            for a, b in zip(again, fresh)
        )
