"""DeepSeek-OCR model parts: DeepEncoder, its checkpoint loading and preprocessing."""

from optical_memory.model.checkpoint import CheckpointError, CheckpointReport, check_checkpoint
from optical_memory.model.config import ClipConfig, ConfigError, EncoderConfig, SamConfig
from optical_memory.model.context import ContextOverflowError, DecoderInputs, PageImage
from optical_memory.model.deepencoder import DeepEncoder
from optical_memory.model.encoder import Encoder, load_encoder, random_encoder_tensors
from optical_memory.model.optical_model import OpticalModel, load_decoder, load_model
from optical_memory.model.preprocess import MAX_IMAGE_PIXELS, make_views

__all__ = [
    "MAX_IMAGE_PIXELS",
    "CheckpointError",
    "CheckpointReport",
    "ClipConfig",
    "ConfigError",
    "ContextOverflowError",
    "DecoderInputs",
    "DeepEncoder",
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
    "random_encoder_tensors",
]
