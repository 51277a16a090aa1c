"""DeepSeek-OCR model parts: DeepEncoder, its checkpoint loading and preprocessing."""

from optical_memory.model.checkpoint import CheckpointError, CheckpointReport, check_checkpoint
from optical_memory.model.config import ClipConfig, ConfigError, EncoderConfig, SamConfig
from optical_memory.model.deepencoder import DeepEncoder
from optical_memory.model.encoder import Encoder, load_encoder, random_encoder_tensors
from optical_memory.model.preprocess import MAX_IMAGE_PIXELS, make_views

__all__ = [
    "MAX_IMAGE_PIXELS",
    "CheckpointError",
    "CheckpointReport",
    "ClipConfig",
    "ConfigError",
    "DeepEncoder",
    "Encoder",
    "EncoderConfig",
    "SamConfig",
    "check_checkpoint",
    "load_encoder",
    "make_views",
    "random_encoder_tensors",
]
