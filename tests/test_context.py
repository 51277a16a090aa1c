"""Context assembly: placeholder expansion, scatter order, window overflow, cached pages."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from optical_memory.backends.deepseek_ocr import ContextOverflowError, PageImage, load_model
from optical_memory.backends.deepseek_ocr.context import split_prompt
from optical_memory.backends.deepseek_ocr.testing import write_checkpoint
from optical_memory.modes import get_mode


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, "cpu", torch.float32)


def page(n: int, value: float) -> torch.Tensor:
    return torch.full((n, 64), value) + torch.arange(n)[:, None] * 0.001


def test_plain_format_and_scatter_order(model):
    tok = model.tokenizer
    a, b = page(5, 1.0), page(3, 2.0)
    inputs = model.assemble(["hello", a, " world", b, "\nFree OCR."], max_new_tokens=4)
    ids = inputs.input_ids[0].tolist()
    expected = [
        tok.bos_id,
        *tok.encode("hello"),
        *[tok.image_id] * 5,
        *tok.encode(" world"),
        *[tok.image_id] * 3,
        *tok.encode("\nFree OCR."),
    ]
    assert ids == expected
    start_b = 1 + len(tok.encode("hello")) + 5 + len(tok.encode(" world"))
    assert inputs.page_spans == [
        (start_b - len(tok.encode(" world")) - 5, start_b - len(tok.encode(" world"))),
        (start_b, start_b + 3),
    ]
    embeds = inputs.inputs_embeds[0]
    (s0, e0), (s1, e1) = inputs.page_spans
    torch.testing.assert_close(embeds[s0:e0], a)
    torch.testing.assert_close(embeds[s1:e1], b)
    text_pos = ~inputs.image_mask[0]
    torch.testing.assert_close(
        embeds[text_pos], model.decoder.embed_tokens(inputs.input_ids[0][text_pos])
    )
    assert inputs.position_ids[0].tolist() == list(range(len(ids)))
    assert inputs.attention_mask.sum() == len(ids)


def test_page_images_expand_to_their_vision_token_counts(model):
    img = Image.new("RGB", (1000, 1400), "white")
    inputs = model.assemble(
        [PageImage(img, "gundam"), "x", PageImage(img, "tiny")], max_new_tokens=1
    )
    sizes = [e - s for s, e in inputs.page_spans]
    assert sizes == [get_mode("gundam").vision_tokens(1000, 1400), get_mode("tiny").vision_tokens()]
    assert int(inputs.image_mask.sum()) == sum(sizes)


def test_cached_embeddings_are_used_as_given_and_not_reencoded(model, monkeypatch):
    img = Image.new("RGB", (640, 640), "white")
    cached = model.encoder.encode(img, "small")

    def fail(*args, **kwargs):
        raise AssertionError("encoder called for a cached page")

    monkeypatch.setattr(model.encoder, "encode", fail)
    inputs = model.assemble([cached, "question?"], max_new_tokens=2)
    s, e = inputs.page_spans[0]
    torch.testing.assert_close(inputs.inputs_embeds[0, s:e], cached)
    monkeypatch.undo()
    fresh = model.assemble([PageImage(img, "small"), "question?"], max_new_tokens=2)
    torch.testing.assert_close(fresh.inputs_embeds, inputs.inputs_embeds)


def test_window_overflow(model):
    window = model.window
    big = page(window - 10, 0.5)
    model.assemble([big], max_new_tokens=9)  # BOS + pages + answer == window - 0 fits
    with pytest.raises(ContextOverflowError) as err:
        model.assemble([big], max_new_tokens=10)
    assert err.value.context_tokens == window - 9 and err.value.window == window
    assert str(window) in str(err.value)


def test_bad_segments(model):
    with pytest.raises(ValueError, match=r"\[n_tokens > 0, 64\]"):
        model.assemble([torch.zeros(4, 32)])
    with pytest.raises(TypeError, match="segment 1"):
        model.assemble(["a", 3])
    with pytest.raises(ValueError, match="placeholder"):
        model.assemble(["look: <image>"])
    with pytest.raises(ValueError, match="unknown mode"):
        PageImage(Image.new("RGB", (8, 8)), "huge")


def test_split_prompt_checks_placeholders():
    img = PageImage(Image.new("RGB", (8, 8)), "tiny")
    assert split_prompt("<image>\nFree OCR.", [img]) == [img, "\nFree OCR."]
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        split_prompt("<image> and", [img, img])
    with pytest.raises(ValueError, match="empty prompt"):
        split_prompt("  ", [])


def test_load_model_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere", "cpu")
    ckpt = write_checkpoint(tmp_path / "no_tok", tokenizer=False)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_model(ckpt, "cpu")
    with pytest.raises(ValueError, match="dtype"):
        load_model(ckpt, "cpu", "int8")
