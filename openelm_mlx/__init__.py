"""openelm-mlx: Apple's OpenELM language models on MLX."""

from .config import OpenELMConfig
from .io import CheckpointError, load, load_model, save
from .model import Model
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "Model", "OpenELMConfig", "Tokenizer", "load", "load_model", "save"]
