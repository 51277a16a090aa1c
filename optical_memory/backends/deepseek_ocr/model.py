"""The whole DeepSeek-OCR model: DeepEncoder, decoder and tokenizer from one checkpoint directory."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from optical_memory.backends.deepseek_ocr import weights
from optical_memory.backends.deepseek_ocr.configuration import DecoderConfig, EncoderConfig
from optical_memory.backends.deepseek_ocr.context import (
    ContextAssembler,
    DecoderInputs,
    PageImage,
    Segment,
    split_prompt,
)
from optical_memory.backends.deepseek_ocr.generation import GenerationConfig, generate_ids
from optical_memory.backends.deepseek_ocr.modeling_decoder import DeepseekOCRDecoder, build_decoder
from optical_memory.backends.deepseek_ocr.runtime import Encoder
from optical_memory.backends.deepseek_ocr.scheduler import Scheduler
from optical_memory.backends.deepseek_ocr.tokenizer import OCRTokenizer


def load_encoder(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    sam_implementation: str = "fast",
    cuda_graphs: bool | None = None,
) -> Encoder:
    """Load DeepEncoder from a checkpoint directory (config.json + *.safetensors, official names).

    Works with the full DeepSeek-OCR checkpoint and with a directory holding only
    the encoder tensors. Missing, unexpected or mis-shaped encoder tensors raise
    one CheckpointError listing all of them, before any tensor is read; config.json's
    sizes are bounded before anything is built from them. `sam_implementation`: "fast" (default;
    see `sam_attention`: relative positions folded into the query-key product,
    patch embedding as a GEMM) or "transformers" (its SAM modules as they are);
    both compute the same function. `cuda_graphs` (default: on for CUDA) replays
    one captured CUDA graph per input shape.
    """
    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise weights.CheckpointError(f"{directory}: no config.json")
    config = EncoderConfig.from_dict(weights.read_config(directory))
    locations = weights.tensor_locations(directory)
    if not locations:
        raise weights.CheckpointError(f"{directory}: no *.safetensors files")
    expected = weights.expected_shapes(weights.encoder_shapes(config))
    problems = weights.compare(locations, expected)
    if problems:
        raise weights.CheckpointError(
            f"{directory}: encoder tensors do not match config.json\n{problems.describe()}"
        )
    tensors = weights.read_tensors(locations, sorted(expected))
    return Encoder.from_tensors(
        config,
        tensors,
        device,
        dtype,
        sam_implementation=sam_implementation,
        cuda_graphs=cuda_graphs,
    )


def load_decoder(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> DeepseekOCRDecoder:
    """The decoder of a checkpoint directory (config.json + safetensors, official names).

    config.json's sizes are bounded first; then every decoder tensor's name and shape is
    checked against it from the safetensors headers, and one CheckpointError lists the
    missing, unexpected and mis-shaped tensors before any is read."""
    path = Path(path)
    dev, dt = weights.resolve_device_dtype(device, dtype)
    config = DecoderConfig.from_checkpoint_config(weights.read_config(path))
    tensors = weights.convert_decoder_tensors(
        weights.checked_decoder_tensors(path, config), config, device=dev, dtype=dt
    )
    return build_decoder(config, tensors, device=dev, dtype=dt)


class OpticalModel:
    """DeepEncoder + DeepSeek-3B-MoE decoder + tokenizer, answering contexts of pages and text.

    A context is a sequence of segments (see `optical_memory.backends.deepseek_ocr.context`):
    text, `PageImage` (encoded on the fly) or cached page embeddings.
    """

    def __init__(self, encoder: Any, decoder: DeepseekOCRDecoder, tokenizer: OCRTokenizer) -> None:
        if encoder is not None and encoder.hidden_size != decoder.config.hidden_size:
            raise ValueError(
                f"encoder width {encoder.hidden_size} != decoder width {decoder.config.hidden_size}"
            )
        if tokenizer.vocab_size > decoder.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens, the decoder only {decoder.config.vocab_size}"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.window = decoder.config.max_position_embeddings
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()
        self._assembler = ContextAssembler(
            tokenizer,
            decoder.embed_tokens,
            self.window,
            encode=self._encode if encoder is not None else None,
        )

    @property
    def token_counter(self) -> OCRTokenizer:
        """Counts decoder tokens of a text (`name`, `count(text)`)."""
        return self.tokenizer

    def _encode(self, pages: Sequence[PageImage]) -> list[torch.Tensor]:
        return [self.encoder.encode(p.image, p.mode) for p in pages]

    def assemble(self, segments: Sequence[Segment], max_new_tokens: int = 512) -> DecoderInputs:
        """Decoder inputs for a context; raises ContextOverflowError past the window."""
        return self._assembler.assemble(segments, max_new_tokens)

    @torch.no_grad()
    def logits(self, segments: Sequence[Segment]) -> torch.Tensor:
        """Float32 logits [seq, vocab] of the first forward pass over the context."""
        inputs = self.assemble(segments, max_new_tokens=0)
        return self.decoder(
            inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
        )[0]

    def generate_ids(self, segments: Sequence[Segment], **options: Any) -> list[int]:
        """Generated token ids (EOS included when reached); options as `generate`."""
        config = GenerationConfig(**options)
        inputs = self.assemble(segments, config.max_new_tokens)
        return list(generate_ids(self.decoder, inputs, config, self.tokenizer.eos_id))

    def scheduler(self, **options: Any) -> Scheduler:
        """The model's continuous-batching scheduler, created on first use with `options`
        (see `Scheduler`); one per model, shared by every thread."""
        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self.decoder, self.tokenizer.eos_id, **options)
            return self._scheduler

    def answer_text(self, ids: list[int]) -> str:
        """Generated ids as text, the final EOS (if reached) removed."""
        return self.tokenizer.decode(ids[:-1] if ids and ids[-1] == self.tokenizer.eos_id else ids)

    def generate(
        self,
        segments: Sequence[Segment],
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        no_repeat_ngram_size: int | None = None,
        seed: int | None = None,
    ) -> str:
        """The answer to a context as text (EOS removed). Greedy unless `do_sample`."""
        ids = self.generate_ids(
            segments,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            no_repeat_ngram_size=no_repeat_ngram_size,
            seed=seed,
        )
        return self.answer_text(ids)

    def stream(self, segments: Sequence[Segment], **options: Any) -> Iterator[str]:
        """Yield the answer as it is generated, in text pieces that concatenate to `generate`'s text.

        A piece is held back while it ends in an incomplete UTF-8 sequence.
        """
        config = GenerationConfig(**options)
        inputs = self.assemble(segments, config.max_new_tokens)
        yield from self.text_pieces(generate_ids(self.decoder, inputs, config, self.tokenizer.eos_id))

    def text_pieces(self, tokens: Iterable[int]) -> Iterator[str]:
        """Generated ids -> text pieces as they come (EOS dropped; incomplete UTF-8 held back)."""
        ids: list[int] = []
        sent = ""
        for token in tokens:
            if token == self.tokenizer.eos_id:
                break
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(sent):
                yield text[len(sent) :]
            sent = text
        text = self.tokenizer.decode(ids)
        if len(text) > len(sent):
            yield text[len(sent) :]

    def generate_from_prompt(
        self, prompt: str, images: Sequence[PageImage | torch.Tensor] = (), **options: Any
    ) -> str:
        """Answer a prompt whose `<image>` placeholders stand for `images`, in order.

        `model.generate_from_prompt("<image>\\nFree OCR.", images=[PageImage(img, "base")])`
        """
        return self.generate(split_prompt(prompt, images), **options)


def load_model(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> OpticalModel:
    """Load a DeepSeek-OCR checkpoint directory (config.json, tokenizer.json, *.safetensors).

    bf16 on CUDA and float32 on CPU by default. A directory lacking the decoder
    or the tokenizer raises an error naming what is missing.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    dev, dt = weights.resolve_device_dtype(device, dtype)
    config = weights.read_config(path)
    lang = DecoderConfig.from_checkpoint_config(config)
    EncoderConfig.from_dict(config)  # both configurations checked before anything is loaded
    tokenizer = OCRTokenizer.from_dir(path, bos_id=lang.bos_token_id, eos_id=lang.eos_token_id)
    decoder = load_decoder(path, dev, dt)
    encoder = load_encoder(path, device=dev, dtype=dt)
    return OpticalModel(encoder, decoder, tokenizer)
