from .config import SUPPORTED_FAMILIES, CheckpointError, ModelConfig, parse_dtype
from .decoder import AttentionMetadata, Decoder
from .loader import load_model

__all__ = ["SUPPORTED_FAMILIES", "CheckpointError", "ModelConfig", "parse_dtype", "AttentionMetadata", "Decoder", "load_model"]
