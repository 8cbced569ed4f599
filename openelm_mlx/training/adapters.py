"""LoRA and DoRA adapters on OpenELM: mlx-lm's adapter layers swapped into the one model, mlx-lm's adapter
folder format (save, load) and fusing adapters back into the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..errors import CheckpointError, OptionError
from ..folders.fs import atomic_output_dir, check_output, require_regular_file
from ..folders.io import read_json
from ..folders.weights import check_tensors, load_safetensors
from ..quant.recipes import QUANTIZED
from .adapter_config import check_finite, parse_adapter_config

ADAPTERS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1
# target name -> mlx-lm key: relative to a decoder layer, or the full path for the embedding
TARGETS = {
    "qkv_proj": "attn.qkv_proj",
    "out_proj": "attn.out_proj",
    "proj_1": "ffn.proj_1",
    "proj_2": "ffn.proj_2",
    "token_embeddings": "transformer.token_embeddings",
}
DEFAULT_TARGETS = "qkv_proj,out_proj,proj_1,proj_2"
_DEFAULT_KEYS = [TARGETS[t] for t in DEFAULT_TARGETS.split(",")]
ADAPTER_TYPES = (LoRALinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)
FUSE_TOLERANCE = {mx.float32: 1e-5, mx.float16: 5e-3, mx.bfloat16: 3e-2}  # relative, by weight dtype


def add_adapters(model: nn.Module, num_layers: int, params: dict[str, Any], dora: bool = False) -> nn.Module:
    """Freeze `model` and swap its target modules (in the last `num_layers` layers) for mlx-lm's LoRA or DoRA
    layers wrapping them, in place: only the adapters train; a quantized base gives QLoRA."""
    embedding = model.transformer.token_embeddings
    if dora and TARGETS["token_embeddings"] in params["keys"] and isinstance(embedding, nn.QuantizedEmbedding):
        raise OptionError("dora", "DoRA on a quantized token embedding is not supported: drop token_embeddings")
    if any(isinstance(m, ADAPTER_TYPES) for _, m in model.named_modules()):
        raise OptionError("adapter_path", "the model already has adapters")
    model.freeze()
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    return model


def save_adapters(
    model: nn.Module, folder: str | Path, config: dict[str, Any], extra: dict[str, str] | None = None
) -> Path:
    """Write the trainable (adapter) weights and `config` to `folder` atomically (plus `extra` text files)."""
    with atomic_output_dir(folder, force=True, kind="adapters") as tmp:
        mx.save_safetensors(str(tmp / ADAPTERS_FILE), dict(tree_flatten(model.trainable_parameters())))
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)


def load_adapters(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Apply the adapters saved in `adapter_path` to a loaded model, in place (unfused; eval mode).

    Raises:
        CheckpointError: naming the file, when the folder is incomplete or does not fit this model.
    """
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not an adapter folder (expected {ADAPTER_CONFIG_FILE}, {ADAPTERS_FILE})")
    config_path, weights_path = folder / ADAPTER_CONFIG_FILE, folder / ADAPTERS_FILE
    num_layers, params, dora = parse_adapter_config(
        read_json(config_path), config_path, len(model.layers), TARGETS.values(), _DEFAULT_KEYS, FORMAT_VERSION
    )
    weights = load_safetensors(require_regular_file(weights_path))
    check_finite(weights, weights_path)
    try:
        add_adapters(model, num_layers, params, dora)
    except OptionError as e:
        raise CheckpointError(f"{config_path}: {e.detail}") from None
    check_tensors(weights, dict(tree_flatten(model.trainable_parameters())), weights_path, "these adapters")
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    mx.eval(model.parameters())
    return model


# --- fusing --------------------------------------------------------------------------------------


def _relative_difference(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30)).item()


def _requantize(module: nn.Module, like: nn.Module) -> nn.Module:
    if isinstance(like, nn.QuantizedEmbedding):
        return nn.QuantizedEmbedding.from_embedding(module, like.group_size, like.bits, mode=like.mode)
    return nn.QuantizedLinear.from_linear(module, like.group_size, like.bits, mode=like.mode)


def fuse_adapters(model: nn.Module, probe: mx.array, dequantize: bool = False) -> dict[str, float]:
    """Merge every adapter into the layer it wraps, in place, and check the result on `probe` token ids.

    Adapted layers over a quantized base are merged in float, checked, then quantized again with the
    same settings (a lossy step, measured as "requantize_error"), or the whole model is dequantized.

    Returns:
        {"fuse_error": relative max logit difference of the float merge, "requantize_error" (if any)}.

    Raises:
        CheckpointError: the merged model's logits differ from the adapted model's beyond float rounding.
    """
    model.eval()
    before = model(probe)
    if not mx.all(mx.isfinite(before)).item():
        raise CheckpointError(
            "the adapted model's logits are NaN or infinite: these adapters or their scale are unusable"
        )
    fused, bases = [], {}
    for name, m in model.named_modules():
        if isinstance(m, ADAPTER_TYPES):
            fused.append((name, m.fuse(dequantize=True)))
            base = m.embedding if isinstance(m, (LoRAEmbedding, DoRAEmbedding)) else m.linear
            if isinstance(base, QUANTIZED):
                bases[name] = base
    model.update_modules(tree_unflatten(fused))
    error = _relative_difference(model(probe), before)
    tolerance = FUSE_TOLERANCE.get(model.transformer.norm.weight.dtype, 3e-2)
    if not error <= tolerance:
        raise CheckpointError(f"fused logits differ from the adapted model's by {error:.2e} (allowed {tolerance:.0e})")
    result = {"fuse_error": error}
    if dequantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    elif bases:
        model.update_modules(tree_unflatten([(n, _requantize(m, bases[n])) for n, m in fused if n in bases]))
        result["requantize_error"] = _relative_difference(model(probe), before)
    mx.eval(model.parameters())
    return result


def probe_tokens(vocab_size: int, seed: int = 0) -> mx.array:
    """A fixed (2, 24) batch of token ids for checking a fused model."""
    return mx.array(np.random.default_rng(seed).integers(3, max(4, vocab_size), (2, 24)).astype(np.int32))


def fuse_model(
    model_path: str | Path,
    adapter_path: str | Path,
    output: str | Path,
    dequantize: bool = False,
    tokenizer: str | Path | None = None,
    force: bool = False,
) -> dict[str, float]:
    """Load a model, apply and fuse the adapters in `adapter_path`, check, and save a normal model folder."""
    from ..folders.io import load, save

    check_output(output, force, "model", (model_path, adapter_path))
    model, tok = load(model_path, tokenizer)
    load_adapters(model, adapter_path)
    result = fuse_adapters(model, probe_tokens(tok.vocab_size), dequantize)
    save(model, output, tokenizer=tok, force=force, inputs=(model_path, adapter_path))
    return result
