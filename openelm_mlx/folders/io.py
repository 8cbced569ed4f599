"""Model folders in the MLX format (config.json + safetensors, what `mlx_lm.load` reads): `load` and `save`.

Apple's own Hugging Face folders load directly. Reading is strict (see `weights.py`); writing is
atomic and never touches files the user keeps in the folder (see `fs.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ..errors import CheckpointError, ConfigError, OptionError, TokenizerNotFoundError
from ..model.config import FLOAT16_OVERFLOW, OpenELMConfig
from ..model.decoder import Model
from ..quant.recipes import apply_quantization, quantization_settings
from .fs import atomic_output_dir, require_regular_file
from .weights import MAX_SHARD_BYTES, check_weights, parse_json, read_weights, write_weights

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MAX_CONFIG_BYTES = 1 << 20


def parse_dtype(name: str | mx.Dtype, option: str = "dtype") -> mx.Dtype:
    """`float32`, `float16` or `bfloat16` (by name or as the MLX dtype) as an MLX dtype; anything else raises
    OptionError."""
    if isinstance(name, mx.Dtype) and name in DTYPES.values():
        return name
    if not isinstance(name, str) or name not in DTYPES:
        raise OptionError(option, f"must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_cast(config: OpenELMConfig, raw: dict[str, Any], dtype: mx.Dtype, path: Path) -> None:
    """Refuse casting a 3B-shaped model to float16, where its activations overflow (one saved in float16 loads)."""
    if dtype == mx.float16 and config.is_3b_shaped and raw.get("torch_dtype") != "float16":
        raise OptionError("dtype", f"{Path(path) / 'config.json'}: {FLOAT16_OVERFLOW}; use bfloat16 or float32")


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def cast_floating(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every floating-point parameter (weights, norms, quantization scales and biases) to `dtype`, lazily;
    packed quantized weights stay as they are."""
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))


def compute_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype the model computes in (its final norm's weight: float even in a quantized model)."""
    return model.transformer.norm.weight.dtype


def read_json(path: Path) -> dict[str, Any]:
    """Read a (small) JSON object, raising CheckpointError naming the file on any problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    require_regular_file(path)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes is too large for a config file")
    data = parse_json(path, path.read_bytes())
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config(model_dir: Path) -> tuple[OpenELMConfig, dict[str, Any]]:
    """The architecture config and the raw config.json dict of a model folder."""
    path = Path(model_dir) / "config.json"
    raw = read_json(path)
    try:
        return OpenELMConfig.from_dict(raw), raw
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None


def _check_plausible(config: OpenELMConfig, files: dict[str, Path], path: Path) -> None:
    """Refuse a config far larger than the weight files could hold, before building the model."""
    on_disk = sum(f.stat().st_size for f in set(files.values()))
    if config.num_parameters() / 4 > on_disk + (1 << 20):  # 2-bit weights are a quarter of a byte
        raise ConfigError(
            f"{path / 'config.json'}: describes {config.num_parameters():,} parameters, "
            f"more than the {on_disk:,} bytes of weights could hold"
        )


def load_model(path: str | Path, lazy: bool = False, dtype: str | None = None) -> Model:
    """Load an OpenELM model from a local folder (MLX format or Apple's Hugging Face safetensors).

    Args:
        path: folder with config.json and model*.safetensors (sharded with an index or not).
        lazy: leave weights memory-mapped until first use.
        dtype: cast the floating-point weights to float32, bfloat16 or float16 as they load (default: as saved).

    Raises:
        CheckpointError: missing/corrupt files, unknown or missing tensors, wrong shapes.
        OptionError: an unknown `dtype`.
    """
    target = None if dtype is None else parse_dtype(dtype)
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model folder")
    config, raw = read_config(path)
    if target is not None:
        check_cast(config, raw, target, path)
    weights, sources = read_weights(path)
    _check_plausible(config, sources, path)
    model = Model(config)
    if raw.get("quantization"):
        apply_quantization(model, raw["quantization"], lambda p: f"{p}.scales" in weights, path / "config.json")
    check_weights(model, weights, sources)
    model.load_weights(list(weights.items()))
    weights.clear()  # the model holds the only references now (a cast then frees each saved tensor)
    model.eval()
    if target is None:
        if not lazy:
            mx.eval(model.parameters())
        return model
    cast_floating(model, target)
    if not lazy:  # one tensor at a time, so the saved copy and the cast one are never both whole in memory
        for _, p in tree_flatten(model.parameters()):
            mx.eval(p)
    return model


def model_config_dict(model: Model, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for a model: Apple's fields, dtype, and quantization settings if any."""
    d = model.config.to_dict()
    d["torch_dtype"] = dtype_name(compute_dtype(model))
    if (q := quantization_settings(model)) is not None:
        d["quantization"] = q
    return {**d, **(extra or {})}


def save(
    model: Model,
    path: str | Path,
    tokenizer: Any = None,
    config_extra: dict[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    force: bool = False,
    inputs: tuple[str | Path, ...] = (),
) -> Path:
    """Save in the MLX community format (`load_model` and `mlx_lm.load` read it), atomically.

    Args:
        model: the model (float or quantized with `nn.quantize`).
        path: output folder: new, empty, or an earlier output of ours (else `force`; files we did
            not write are kept either way).
        tokenizer: optional; anything with `save(folder)` (see `openelm_mlx.generation.tokenizer.Tokenizer`).
        config_extra: extra config.json entries.
        force: write into a folder we did not create (see `fs.check_output`).
        inputs: paths the model was made from; `path` may not be one of them.

    Returns:
        The output folder.
    """
    weights = dict(tree_flatten(model.parameters()))
    with atomic_output_dir(path, force=force, kind="model", inputs=inputs) as tmp:
        write_weights(tmp, weights, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(model_config_dict(model, config_extra), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(path)


def load(
    path_or_repo: str | Path,
    tokenizer: str | Path | None = None,
    chat_template: bool | None = None,
    lazy: bool = False,
    dtype: str | None = None,
) -> tuple[Model, Any]:
    """Load a model and its tokenizer from a folder or a Hugging Face repo id.

    Args:
        path_or_repo: local model folder, or a Hub repo id (only the needed files are fetched).
        tokenizer: a tokenizer.model path, a folder holding one, or a Hub repo id; default: the
            model folder's own (Apple's repos ship none: pass e.g. "hf-internal-testing/llama-tokenizer").
        chat_template: force the Instruct template on/off; default: recorded, else named "Instruct".
        lazy: leave weights memory-mapped until first use.
        dtype: cast the floating-point weights to float32, bfloat16 or float16 (default: as saved). On MLX's CPU
            backend with a fast BLAS, float32 generates several times faster than bfloat16 (see the README).

    Returns:
        (model, tokenizer)

    Raises:
        CheckpointError, TokenizerNotFoundError, HubError: with what to do.
        OptionError: an unknown `dtype` (before anything is read or fetched).
    """
    from ..generation.tokenizer import LLAMA_VOCAB_SIZE, TOKENIZER_FILE, find_tokenizer
    from .hub import resolve

    if path_or_repo is None or not str(path_or_repo).strip():
        raise OptionError("model", "is an empty path")
    if dtype is not None:
        target = parse_dtype(dtype)
        if target == mx.float16 and not Path(path_or_repo).exists():
            # A Hub repo: read its config first, so a 3B refused in float16 costs one small file, not its weights.
            config_folder = resolve(path_or_repo, patterns=("config.json",))
            check_cast(*read_config(config_folder), target, config_folder)
    folder = resolve(path_or_repo)
    model = load_model(folder, lazy=lazy, dtype=dtype)
    try:
        tok = find_tokenizer(folder, tokenizer, chat_template, name=str(path_or_repo))
    except TokenizerNotFoundError:
        if model.config.vocab_size == LLAMA_VOCAB_SIZE:
            raise  # Apple's models: its message says how to attach the LLaMA tokenizer
        raise CheckpointError(
            f"{folder} has no {TOKENIZER_FILE}, and its {model.config.vocab_size}-token vocabulary is not the LLaMA "
            f"tokenizer's {LLAMA_VOCAB_SIZE}: give the tokenizer this model was trained with"
        ) from None
    check_tokenizer(tok, model.config)
    return model, tok


def check_tokenizer(tokenizer: Any, config: OpenELMConfig) -> None:
    """A tokenizer must fit the model exactly: more pieces than embedding rows would index past the table, fewer
    leave ids the model can produce that the tokenizer cannot decode.

    Raises:
        CheckpointError: naming the tokenizer file and both sizes.
    """
    pieces, rows = tokenizer.vocab_size, config.vocab_size
    if pieces > rows:
        raise CheckpointError(
            f"{tokenizer.model_file}: has {pieces} pieces but the model's vocabulary is "
            f"{rows}: this tokenizer does not belong to this model"
        )
    if pieces < rows:
        raise CheckpointError(
            f"{tokenizer.model_file}: has {pieces} pieces but the model's vocabulary is {rows}: this tokenizer "
            f"does not belong to this model (if rows {pieces} and up are padding, as in CoreNet checkpoints, "
            f"convert the checkpoint again with this tokenizer or a vocabulary size of {pieces})"
        )
