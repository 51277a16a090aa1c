"""The local DeepSeek-OCR backend: our DeepEncoder, decoder and vision-token cache.

The reference backend. Pages are encoded at their tier (the DeepEncoder mode of
the same name) and their embeddings cached in the store, keyed by the page's
content, the render configuration, the mode and the encoder's weights; the
decoder reads [page embeddings, oldest first] + "\\n" + recent text + query, as
the reference prompt format does. Window, tiers and token counting come from
the checkpoint's config.json and tokenizer.json, so planning needs no torch;
the model itself is loaded on first use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from optical_memory.backends.base import Answer, AnswerStream, Backend
from optical_memory.backends.deepseek_ocr.configuration import DecoderConfig
from optical_memory.backends.profiles import Profile, deepseek_ocr_profile
from optical_memory.cache import cache_key
from optical_memory.modes import get_mode
from optical_memory.plan import PagePlan, Plan
from optical_memory.prompt import PageSource, Prompt, format_query
from optical_memory.tokens import TokenCounter

if TYPE_CHECKING:
    import torch

    from optical_memory.backends.deepseek_ocr.model import OpticalModel


@dataclass(frozen=True)
class Context:
    """Decoder inputs for a plan: `segments` (page embeddings, oldest first, then text)."""

    plan: Plan
    segments: list[Any]
    encoded: int  # pages encoded for this call (the rest came from the cache)


class DeepSeekOCRBackend(Backend):
    """DeepSeek-OCR from a local checkpoint directory (or an already loaded `OpticalModel`).

    `device` and `dtype` default to CUDA in bf16 when available, else CPU in float32.
    `batching`: answers from all threads share the model's continuous-batching `Scheduler`
    (default: on for CUDA); `scheduler` holds its options (max_batch, kv_cache_tokens, ...).
    """

    name = "deepseek-ocr"

    def __init__(
        self,
        checkpoint: str | os.PathLike | OpticalModel,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batching: bool | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        self._batching, self._scheduler_options = batching, dict(scheduler or {})
        self._model: OpticalModel | None = None
        self.path: Path | None = None
        if isinstance(checkpoint, (str, os.PathLike)):
            self.path = Path(checkpoint)
            if not self.path.is_dir():
                raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        else:
            self._model = checkpoint
        self._device, self._dtype = device, dtype

    @classmethod
    def from_spec(cls, argument: str | None, **options: Any) -> DeepSeekOCRBackend:
        if not argument:
            raise ValueError("backend 'deepseek-ocr' needs a checkpoint directory: deepseek-ocr:DIR")
        return cls(argument, **options)

    @property
    def description(self) -> str:
        return f"deepseek-ocr backend ({self.path or 'loaded model'})"

    @property
    def model(self) -> OpticalModel:
        """The model, loaded on first use."""
        if self._model is None:
            from optical_memory.backends.deepseek_ocr.model import load_model

            self._model = load_model(self.path, device=self._device, dtype=self._dtype)
        return self._model

    @cached_property
    def _decoder_config(self) -> DecoderConfig:
        if self._model is not None:
            return self._model.decoder.config
        from optical_memory.backends.deepseek_ocr.weights import read_config

        return DecoderConfig.from_checkpoint_config(read_config(self.path))

    @cached_property
    def profile(self) -> Profile:
        return deepseek_ocr_profile(self._decoder_config.max_position_embeddings)

    @cached_property
    def counter(self) -> TokenCounter:
        """The checkpoint's own tokenizer (no torch needed to read it)."""
        if self._model is not None:
            return self._model.token_counter
        from optical_memory.backends.deepseek_ocr.tokenizer import OCRTokenizer

        config = self._decoder_config
        return OCRTokenizer.from_dir(
            self.path, bos_id=config.bos_token_id, eos_id=config.eos_token_id
        )

    # --- vision tokens ----------------------------------------------------------------
    def encode_pages(
        self,
        memory: PageSource,
        session_id: str,
        plan: Plan,
        progress: bool = False,
        batch_size: int = 8,
    ) -> tuple[list[torch.Tensor], int]:
        """Vision tokens of the plan's pages in context, oldest first; encodes only cache misses.

        Misses are encoded in batches of up to `batch_size` pages of one mode.
        """
        encoder = self.model.encoder
        dtype = str(encoder.dtype).removeprefix("torch.")
        records = {r.index: r for r in memory.pages(session_id)}
        wanted = plan.in_context()
        out: dict[int, torch.Tensor] = {}
        misses: dict[str, list[tuple[PagePlan, str]]] = {}
        shapes: dict[int, tuple[int, int]] = {}
        for p in wanted:
            record = records.get(p.index)
            if record is None or record.content_hash != p.content_hash:
                raise LookupError(
                    f"page {p.index} of session {session_id!r} changed since the plan; plan again"
                )
            key = cache_key(p.content_hash, record.fingerprint, p.mode, encoder.cache_id)
            # What the key implies: this page's vision tokens at this mode (the plan's cost is
            # the tier's), the encoder's width and dtype; any other entry is dropped, a miss.
            tokens = get_mode(p.mode).vision_tokens(record.width, record.height)
            shapes[p.index] = (tokens, encoder.hidden_size)
            hit = memory.cache.get_tensor(
                session_id, key, shape=shapes[p.index], dtypes=(dtype,)
            )
            if hit is not None:
                out[p.index] = hit
            else:
                misses.setdefault(p.mode, []).append((p, key))
        encoded = sum(len(group) for group in misses.values())
        memory.store.count_cache(session_id, hits=len(out), misses=encoded)
        with tqdm(total=encoded, desc="encoding pages", unit="page", disable=not progress) as bar:
            for mode, group in misses.items():
                for start in range(0, len(group), batch_size):
                    chunk = group[start : start + batch_size]
                    images = [memory.page_image(session_id, records[p.index]) for p, _ in chunk]
                    for (p, key), embedding in zip(chunk, encoder.encode_batch(images, mode)):
                        if tuple(embedding.shape) == shapes[p.index]:  # else never read back
                            memory.cache.put_tensor(session_id, key, embedding)
                        out[p.index] = embedding
                    bar.update(len(chunk))
        return [out[p.index] for p in wanted], encoded

    def context(self, prompt: Prompt, progress: bool = False) -> Context:
        """Decoder inputs: the pinned text, page embeddings (cached or encoded now), then the
        recent text and the query."""
        embeddings, encoded = self.encode_pages(
            prompt.memory, prompt.session_id, prompt.plan, progress
        )
        text = "\n" + prompt.recent_text() + format_query(prompt.query or "")
        pinned = [prompt.pinned_text() + "\n"] if prompt.pinned else []
        return Context(prompt.plan, [*pinned, *embeddings, text], encoded)

    # --- answers ------------------------------------------------------------------------
    def answer(
        self, prompt: Prompt, *, max_tokens: int, progress: bool = False, **generation: Any
    ) -> Answer:
        """Greedy unless `do_sample`; other options as `OpticalModel.generate`."""
        segments = self.context(prompt, progress).segments
        ids = list(self._tokens(segments, max_tokens, generation))
        finished = bool(ids) and ids[-1] == self.model.tokenizer.eos_id
        return Answer(
            self.model.answer_text(ids), self.name, str(self.path or "deepseek-ocr"),
            usage={"prompt_tokens": prompt.plan.total - prompt.plan.answer_tokens,
                   "completion_tokens": len(ids)},
            finish_reason="stop" if finished else "length",
        )

    def stream(
        self, prompt: Prompt, *, max_tokens: int, progress: bool = False, **generation: Any
    ) -> AnswerStream:
        segments = self.context(prompt, progress).segments
        result = AnswerStream(iter(()))

        def pieces() -> Iterator[str]:
            text = []
            tokens = self._tokens(segments, max_tokens, generation)
            try:
                for piece in self.model.text_pieces(tokens):
                    text.append(piece)
                    yield piece
            finally:  # a consumer that stops early cancels its request
                getattr(tokens, "close", lambda: None)()
            result.answer = Answer("".join(text), self.name, str(self.path or "deepseek-ocr"))

        result.pieces = pieces()
        return result

    def _tokens(self, segments: list[Any], max_tokens: int, generation: dict) -> Iterator[int]:
        """New token ids as they come: through the shared scheduler when batching, else alone.
        Closing the iterator early (a client gone) cancels the request."""
        from optical_memory.backends.deepseek_ocr.generation import GenerationConfig, generate_ids

        model = self.model
        config = GenerationConfig(max_new_tokens=max_tokens, **generation)
        inputs = model.assemble(segments, config.max_new_tokens)
        batching = self._batching
        if batching is None:
            batching = model.decoder.device.type == "cuda"
        if not batching:
            return generate_ids(model.decoder, inputs, config, model.tokenizer.eos_id)
        return iter(model.scheduler(**self._scheduler_options).submit(inputs, config))
