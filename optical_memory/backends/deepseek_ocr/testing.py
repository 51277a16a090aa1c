"""Random DeepSeek-OCR checkpoints with the official layout, at any size, for tests and benchmarks.

`random_encoder_tensors(config)` gives random encoder weights under the
official names; `write_tiny_encoder(dir)` writes a tiny encoder's config
entries and tensors. `write_checkpoint(dir)` writes config.json (the official
structure, with a small `language_config` by default), the decoder tensors
under the official names (per-expert `nn.Linear` weights, not transformers'
stacked ones), the tiny encoder when `encoder=True`, and a tokenizer.json built with `tokenizers` holding BOS, EOS and `<image>`. The
weights are scaled so activations keep unit size through the layers, which
makes logits far from ties: greedy decoding then depends on the weights, not on
rounding.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from optical_memory.backends.deepseek_ocr.configuration import (
    ClipConfig,
    EncoderConfig,
    ProjectorConfig,
    SamConfig,
)
from optical_memory.backends.deepseek_ocr.weights import encoder_shapes, expected_shapes

TINY_HIDDEN = 48


def tiny_encoder_config(hidden_size: int = TINY_HIDDEN) -> EncoderConfig:
    """Official geometry (patch 16, window 14, two stride-2 convs) with tiny widths and depths."""
    return EncoderConfig(
        sam=SamConfig(
            width=32,
            layers=2,
            heads=2,
            global_attn_indexes=(1,),
            downsample_channels=(16, 32),
            out_channels=16,
            mlp_ratio=2.0,
        ),
        clip=ClipConfig(width=32, layers=2, heads=2, intermediate_size=64),
        projector=ProjectorConfig(input_dim=64, n_embed=hidden_size),
    )


def write_tiny_encoder(
    directory: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = TINY_HIDDEN,
    filename: str = "model.safetensors",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Write config entries + random encoder tensors; returns the tensors written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_encoder_config(hidden_size)
    config_path = directory / "config.json"
    merged = json.loads(config_path.read_text()) if config_path.is_file() else {}
    merged.update(config.to_dict())
    config_path.write_text(json.dumps(merged, indent=1))
    tensors = {k: v.to(dtype) for k, v in random_encoder_tensors(config, seed=seed).items()}
    save_file(tensors, str(directory / filename))
    return tensors


def random_encoder_tensors(
    config: EncoderConfig, seed: int = 0, std: float = 0.02
) -> dict[str, torch.Tensor]:
    """Random fp32 encoder weights under the official names, for tests and benchmarks.

    Norm weights are near 1, position tables (absolute, relative, CLIP) ~ N(0, 0.5)
    so that a wrong position mapping shows, the rest ~ N(0, std). Every tensor is
    random: nothing can hide behind zeros.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(expected_shapes(encoder_shapes(config)).items()):
        scale = 0.5 if re.search(r"pos|class_embedding", name) else std
        t = torch.randn(shape, generator=generator) * scale
        if re.search(r"(norm\d?|neck\.[13]|layer_norm\d|pre_layrnorm)\.weight$", name):
            t += 1.0
        out[name] = t
    return out


BOS, EOS, IMAGE = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<image>"

# The official language_config values (config.json of deepseek-ai/DeepSeek-OCR).
OFFICIAL_DECODER: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 1280,
    "intermediate_size": 6848,
    "moe_intermediate_size": 896,
    "num_hidden_layers": 12,
    "num_attention_heads": 10,
    "num_key_value_heads": 10,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "first_k_dense_replace": 1,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "use_mla": False,
    "kv_lora_rank": None,
    "q_lora_rank": None,
    "qk_nope_head_dim": 0,
    "qk_rope_head_dim": 0,
    "v_head_dim": 0,
    "max_position_embeddings": 8192,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

TINY_DECODER: dict[str, Any] = {
    **OFFICIAL_DECODER,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "num_experts_per_tok": 3,
    "max_position_embeddings": 1024,
}

CORPUS = [
    "Free OCR. Convert the document to markdown.\n",
    "user: what did we decide about the release date?\n",
    "assistant: we moved it to Friday after the review.\n",
    "The quick brown fox jumps over the lazy dog 0123456789.\n",
    "Memory fades like human memory: older pages get fewer vision tokens.\n",
]


def decoder_tensors(lang: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random decoder weights for `lang` under the official tensor names (float32)."""
    gen = torch.Generator().manual_seed(seed)
    h, v = lang["hidden_size"], lang["vocab_size"]
    heads, kv_heads = lang["num_attention_heads"], lang["num_key_value_heads"]
    head_dim = h // heads

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) / math.sqrt(in_features)

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(h, generator=gen)

    def mlp(prefix: str, inter: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.gate_proj.weight": linear(inter, h),
            f"{prefix}.up_proj.weight": linear(inter, h),
            f"{prefix}.down_proj.weight": linear(h, inter),
        }

    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(v, h, generator=gen),
        "model.norm.weight": norm(),
        "lm_head.weight": linear(v, h),
    }
    for layer in range(lang["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = norm()
        t[f"{p}.post_attention_layernorm.weight"] = norm()
        t[f"{p}.self_attn.q_proj.weight"] = linear(heads * head_dim, h)
        t[f"{p}.self_attn.k_proj.weight"] = linear(kv_heads * head_dim, h)
        t[f"{p}.self_attn.v_proj.weight"] = linear(kv_heads * head_dim, h)
        t[f"{p}.self_attn.o_proj.weight"] = linear(h, heads * head_dim)
        if layer < lang["first_k_dense_replace"]:
            t.update(mlp(f"{p}.mlp", lang["intermediate_size"]))
            continue
        inter = lang["moe_intermediate_size"]
        t[f"{p}.mlp.gate.weight"] = 4.0 * linear(lang["n_routed_experts"], h)
        for e in range(lang["n_routed_experts"]):
            t.update(mlp(f"{p}.mlp.experts.{e}", inter))
        t.update(mlp(f"{p}.mlp.shared_experts", inter * lang["n_shared_experts"]))
    return t


def write_tokenizer(path: Path, vocab_size: int, image_token_id: int | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer with BOS 0, EOS 1 and `<image>` (at `image_token_id` if given)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size - 1, 400),
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if image_token_id is not None:
        n = tok.get_vocab_size()
        tok.add_special_tokens([f"<reserved_{i}>" for i in range(n, image_token_id)])
    tok.add_special_tokens([IMAGE])
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer needs {tok.get_vocab_size()} ids, vocab_size is {vocab_size}")
    tok.save(str(path / "tokenizer.json"))
    return tok


def write_checkpoint(
    path: str | Path,
    lang: dict[str, Any] | None = None,
    *,
    encoder: bool = True,
    tokenizer: bool = True,
    image_token_id: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a random checkpoint directory; returns its path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lang = dict(lang or TINY_DECODER)
    config: dict[str, Any] = {"model_type": "deepseek_vl_v2", "language_config": lang, **lang}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    tensors = decoder_tensors(lang, seed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "decoder.safetensors"))
    if encoder:
        write_tiny_encoder(
            path, seed=seed + 1, hidden_size=lang["hidden_size"], filename="encoder.safetensors"
        )
    if tokenizer:
        write_tokenizer(path, lang["vocab_size"], image_token_id)
    return path


def write_full_size_checkpoint(
    path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """A random checkpoint with the official shapes throughout (decoder, DeepEncoder, `<image>`
    at id 128815), stored in `dtype`, for GPU benchmarks; about 6.5 GB in bf16."""
    from optical_memory.backends.deepseek_ocr.configuration import EncoderConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lang = dict(OFFICIAL_DECODER)
    encoder = EncoderConfig()
    tensors = {k: v.to(dtype).contiguous() for k, v in decoder_tensors(lang, seed).items()}
    save_file(tensors, str(path / "decoder.safetensors"))
    del tensors
    enc = random_encoder_tensors(encoder, seed=seed + 1)
    save_file({k: v.to(dtype).contiguous() for k, v in enc.items()}, str(path / "encoder.safetensors"))
    write_tokenizer(path, lang["vocab_size"], image_token_id=128815)
    config = {"model_type": "deepseek_vl_v2", "language_config": lang, **lang, **encoder.to_dict()}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path
