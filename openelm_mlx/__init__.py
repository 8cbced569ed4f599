"""openelm-mlx: Apple's OpenELM language models on MLX.

The BLAS loader runs first: on Linux it must load a fast BLAS before anything imports `mlx.core`.
"""

import sys

from .bench import blas

if not blas.help_only(sys.argv):  # `openelm-mlx --help` must work even when a BLAS is broken
    blas.setup()

# ruff: noqa: E402  (the imports below must follow the BLAS setup)

from .errors import CheckpointError, DataError, OpenELMError, OptionError
from .folders.io import load, load_model, save
from .generation.generate import GenerationConfig
from .generation.tokenizer import Tokenizer
from .model.config import OpenELMConfig
from .model.decoder import Model

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
