"""The local DeepSeek-OCR backend: DeepEncoder, the DeepSeek-3B-MoE decoder and their checkpoint.

Laid out as transformers lays out a model: `configuration` (config.json, no
torch), `modeling_deepencoder` and `modeling_decoder` (the modules),
`weights` (official tensor names as data, checkpoint checks, the device and
dtype resolver), `runtime` (the encoder and decoder steps on a device, CUDA
graphs), `model` (loading a whole checkpoint) and `backend` (what the memory
calls). Importing this package imports no torch; the names below load on use.
"""

from importlib import import_module
from typing import Any

_LAZY: dict[str, str] = {
    "DeepSeekOCRBackend": "backend",
    "CheckpointError": "weights",
    "CheckpointReport": "weights",
    "check_checkpoint": "weights",
    "resolve_device_dtype": "weights",
    "ClipConfig": "configuration",
    "ConfigError": "configuration",
    "DecoderConfig": "configuration",
    "EncoderConfig": "configuration",
    "SamConfig": "configuration",
    "ContextOverflowError": "context",
    "DecoderInputs": "context",
    "PageImage": "context",
    "DeepEncoder": "modeling_deepencoder",
    "Encoder": "runtime",
    "OpticalModel": "model",
    "load_decoder": "model",
    "load_encoder": "model",
    "load_model": "model",
    "MAX_IMAGE_PIXELS": "preprocess",
    "make_views": "preprocess",
}

__all__ = [
    "MAX_IMAGE_PIXELS",
    "CheckpointError",
    "CheckpointReport",
    "ClipConfig",
    "ConfigError",
    "ContextOverflowError",
    "DecoderConfig",
    "DecoderInputs",
    "DeepEncoder",
    "DeepSeekOCRBackend",
    "Encoder",
    "EncoderConfig",
    "OpticalModel",
    "PageImage",
    "SamConfig",
    "check_checkpoint",
    "load_decoder",
    "load_encoder",
    "load_model",
    "make_views",
    "resolve_device_dtype",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
