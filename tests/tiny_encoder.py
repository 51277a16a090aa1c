"""A tiny random DeepEncoder checkpoint under the official tensor names, for tests.

`write_tiny_encoder(directory)` merges the encoder's `vision_config` and
`projector_config` into `directory/config.json` (created if absent) and writes
the encoder tensors to `directory/<filename>`; a decoder's tensors can go to
another shard of the same directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from optical_memory.model.config import ClipConfig, EncoderConfig, ProjectorConfig, SamConfig
from optical_memory.model.encoder import random_encoder_tensors

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
