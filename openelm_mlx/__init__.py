"""openelm-mlx: Apple's OpenELM language models on MLX.

The BLAS loader runs first: on Linux it must load a fast BLAS before anything imports `mlx.core`.
"""

from . import blas

blas.setup()

# ruff: noqa: E402  (the imports below must follow the BLAS setup)

from .config import OpenELMConfig
from .errors import CheckpointError, DataError, OpenELMError, OptionError
from .generate import GenerationConfig
from .io import load, load_model, save
from .model import Model
from .tokenizer import Tokenizer

__all__ = [
    "CheckpointError",
    "DataError",
    "GenerationConfig",
    "Model",
    "OpenELMConfig",
    "OpenELMError",
    "OptionError",
    "Tokenizer",
    "load",
    "load_model",
    "save",
]
