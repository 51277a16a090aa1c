"""Token generation over an assembled context, with a KV cache.

Greedy by default (as the reference runs), optional temperature / top-p
sampling, and the reference's no-repeat n-gram rule. Steps run over a static
KV cache (see `decode_step`), replayed from a CUDA graph on the GPU. The logits processors are
transformers' own, applied to the whole id sequence (context placeholders
included) exactly as `generate` would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from optical_memory.backends.deepseek_ocr.context import DecoderInputs
from optical_memory.backends.deepseek_ocr.modeling_decoder import DeepseekOCRDecoder


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    no_repeat_ngram_size: int | None = None
    seed: int | None = None  # sampling only

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size < 1:
            raise ValueError(f"no_repeat_ngram_size must be >= 1, got {self.no_repeat_ngram_size}")

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.no_repeat_ngram_size:
            procs.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@torch.no_grad()
def generate_ids(
    decoder: DeepseekOCRDecoder,
    inputs: DecoderInputs,
    config: GenerationConfig,
    eos_id: int,
) -> Iterator[int]:
    """Yield new token ids one at a time, ending after EOS (included) or `max_new_tokens`."""
    processors = config.processors()
    generator = None
    if config.do_sample and config.seed is not None:
        generator = torch.Generator(device=decoder.device).manual_seed(config.seed)
    ids = inputs.input_ids  # [1, seq]: grows with each new token (for the n-gram rule)
    with decoder.decode_step(batch=1) as step:
        logits = step.prefill(inputs.inputs_embeds, inputs.position_ids)  # [1, vocab]
        for i in range(config.max_new_tokens):
            scores = processors(ids, logits)
            if config.do_sample:
                probs = torch.softmax(scores, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)  # [1, 1]
            else:
                token = scores.argmax(dim=-1, keepdim=True)  # [1, 1]
            value = int(token)
            yield value
            if value == eos_id or i == config.max_new_tokens - 1:
                return
            ids = torch.cat([ids, token], dim=1)
            logits = step(token, torch.full_like(token, ids.shape[1] - 1))
