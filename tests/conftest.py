"""Shared fixtures: tiny random OpenELM models and the optional ../shared data (helpers live in helpers.py)."""

# isort: off
import openelm_mlx  # noqa: F401  (first: it loads the fast BLAS before mlx.core, as our subprocesses do)

# isort: on
from pathlib import Path

import pytest
from helpers import SHARED, random_model

from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.decoder import Model


@pytest.fixture
def tiny_model() -> Model:
    return random_model(OpenELMConfig.tiny())


@pytest.fixture
def llama_tokenizer_path() -> Path:
    path = SHARED / "llama-tokenizer" / "tokenizer.model"
    if not path.is_file():
        pytest.skip("../shared/data/llama-tokenizer is not present")
    return path


@pytest.fixture
def shakespeare_path() -> Path:
    path = SHARED / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    return path
