"""Context assembly: pages and text -> decoder inputs in the reference's "plain" format.

A context is a sequence of segments, oldest first: text (`str`), a page image to
encode now (`PageImage`), or a page's cached vision embeddings (a tensor
[n_tokens, hidden], used exactly as given, so nothing is re-encoded at query
time). The token ids are BOS, then each segment in order: text as its tokens
(no special tokens), a page as `n_tokens` `<image>` placeholders. The input
embeddings are the token embeddings with the page embeddings scattered into the
placeholder positions in order, as the reference model does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from optical_memory.backends.deepseek_ocr.tokenizer import IMAGE_TOKEN, OCRTokenizer
from optical_memory.modes import get_mode


@dataclass(frozen=True)
class PageImage:
    """A page image to be encoded at `mode` (tiny, small, base, large or gundam)."""

    image: Image.Image
    mode: str

    def __post_init__(self) -> None:
        get_mode(self.mode)  # raises ValueError on an unknown mode
        if not isinstance(self.image, Image.Image):
            raise TypeError(f"PageImage.image must be a PIL image, got {type(self.image).__name__}")


Segment = str | PageImage | torch.Tensor


class ContextOverflowError(ValueError):
    """The context plus the answer budget does not fit the decoder window."""

    def __init__(self, context_tokens: int, max_new_tokens: int, window: int) -> None:
        self.context_tokens = context_tokens
        self.max_new_tokens = max_new_tokens
        self.window = window
        super().__init__(
            f"context of {context_tokens} positions plus an answer budget of {max_new_tokens} "
            f"tokens is {context_tokens + max_new_tokens}, over the decoder window of {window}"
        )


@dataclass
class DecoderInputs:
    """One assembled context (batch of one)."""

    input_ids: torch.Tensor  # [1, seq] long, `<image>` at page positions
    inputs_embeds: torch.Tensor  # [1, seq, hidden] in the decoder's dtype
    attention_mask: torch.Tensor  # [1, seq] long, all ones
    position_ids: torch.Tensor  # [1, seq] long, 0..seq-1
    image_mask: torch.Tensor  # [1, seq] bool, True at page positions
    page_spans: list[tuple[int, int]]  # [start, end) of each page's positions, in order

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


EncodeFn = Callable[[Sequence[PageImage]], list[torch.Tensor]]


class ContextAssembler:
    """Builds `DecoderInputs` from segments for one decoder and tokenizer.

    `encode` turns page images into embeddings (the DeepEncoder); it is only
    called for `PageImage` segments, all of one context in one call.
    """

    def __init__(
        self,
        tokenizer: OCRTokenizer,
        embed_tokens: nn.Embedding,
        window: int,
        encode: EncodeFn | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.embed_tokens = embed_tokens
        self.window = window
        self.encode = encode

    def _text_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if self.tokenizer.image_id in ids:
            raise ValueError(
                f"text segment contains the {IMAGE_TOKEN} placeholder; pass pages as PageImage "
                "or embedding tensors, or use generate_from_prompt"
            )
        return ids

    def _page_embeddings(self, segments: Sequence[Segment]) -> list[torch.Tensor]:
        """Embeddings of every page segment in order; page images encoded in one call."""
        hidden = self.embed_tokens.embedding_dim
        images = [s for s in segments if isinstance(s, PageImage)]
        if images and self.encode is None:
            raise ValueError("context holds page images but no encoder is available to encode them")
        encoded = iter(self.encode(images) if images else [])
        pages: list[torch.Tensor] = []
        for index, seg in enumerate(segments):
            if isinstance(seg, PageImage):
                pages.append(next(encoded))
            elif isinstance(seg, torch.Tensor):
                if seg.dim() != 2 or seg.shape[1] != hidden or seg.shape[0] == 0:
                    raise ValueError(
                        f"segment {index}: page embeddings must be [n_tokens > 0, {hidden}], "
                        f"got {list(seg.shape)}"
                    )
                pages.append(seg)
            elif not isinstance(seg, str):
                raise TypeError(
                    f"segment {index}: expected str, PageImage or torch.Tensor, got {type(seg).__name__}"
                )
        return pages

    def assemble(self, segments: Sequence[Segment], max_new_tokens: int = 512) -> DecoderInputs:
        """Decoder inputs for `segments`; ContextOverflowError when they and the answer do not fit."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if isinstance(segments, (str, PageImage, torch.Tensor)):
            segments = [segments]
        pages = self._page_embeddings(segments)
        ids: list[int] = [self.tokenizer.bos_id]
        spans: list[tuple[int, int]] = []
        page_iter = iter(pages)
        for seg in segments:
            if isinstance(seg, str):
                ids += self._text_ids(seg)
            else:
                n = next(page_iter).shape[0]
                spans.append((len(ids), len(ids) + n))
                ids += [self.tokenizer.image_id] * n
        if len(ids) + max_new_tokens > self.window:
            raise ContextOverflowError(len(ids), max_new_tokens, self.window)

        weight = self.embed_tokens.weight
        input_ids = torch.tensor([ids], dtype=torch.long, device=weight.device)
        image_mask = input_ids == self.tokenizer.image_id
        with torch.no_grad():
            embeds = self.embed_tokens(input_ids)  # [1, seq, hidden]
            if pages:
                page_embeds = torch.cat(
                    [p.to(device=weight.device, dtype=weight.dtype) for p in pages]
                )
                embeds[image_mask] = page_embeds
        return DecoderInputs(
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(input_ids),
            position_ids=torch.arange(len(ids), device=weight.device).unsqueeze(0),
            image_mask=image_mask,
            page_spans=spans,
        )


def split_prompt(prompt: str, images: Sequence[PageImage | torch.Tensor]) -> list[Segment]:
    """A prompt with `<image>` placeholders plus its pages -> segments.

    Raises ValueError for an empty prompt or when the number of placeholders
    differs from the number of pages.
    """
    if not prompt or not prompt.strip():
        raise ValueError("empty prompt")
    parts = prompt.split(IMAGE_TOKEN)
    if len(parts) - 1 != len(images):
        raise ValueError(
            f"prompt has {len(parts) - 1} {IMAGE_TOKEN} placeholder(s) but {len(images)} page(s) were given"
        )
    segments: list[Segment] = []
    for i, part in enumerate(parts):
        if part:
            segments.append(part)
        if i < len(images):
            segments.append(images[i])
    return segments
