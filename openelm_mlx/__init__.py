"""openelm-mlx: Apple's OpenELM language models on MLX."""

from .config import OpenELMConfig
from .io import CheckpointError, load_model, save
from .model import Model

__all__ = ["CheckpointError", "Model", "OpenELMConfig", "load_model", "save"]
