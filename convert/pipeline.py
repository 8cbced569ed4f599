"""The file-I/O shell of conversion: Hugging Face / CoreNet checkpoints -> MLX, and MLX -> Hugging Face.

Sources are read tensor by tensor and written shard by shard into a temporary folder, which is
reloaded and shape-checked before it is renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from openelm_mlx.errors import CheckpointError, ConfigError, OptionError
from openelm_mlx.folders.arch import resolve_arch
from openelm_mlx.folders.fs import atomic_output_dir, check_output, require_regular_file
from openelm_mlx.folders.hub import download, local_path
from openelm_mlx.folders.io import check_tokenizer, dtype_name, load_model, model_config_dict, parse_dtype, read_config
from openelm_mlx.folders.weights import (
    INDEX_FILE,
    MAX_SHARD_BYTES,
    check_weights,
    merge_shards,
    read_index,
    write_shards,
    write_weights,
)
from openelm_mlx.generation.tokenizer import TOKENIZER_FILE, Tokenizer, find_tokenizer, uses_chat_template
from openelm_mlx.model.config import FLOAT16_OVERFLOW, OpenELMConfig
from openelm_mlx.model.decoder import Model
from openelm_mlx.quant.recipes import bits_per_weight
from openelm_mlx.quant.run import QuantizeOptions, check_rtn, quantize_rtn

from .tables import HF_TABLE, TABLES, detect_format, invert, map_state_dict
from .tensors import LazyTensor, open_safetensors
from .torch_zip import load_torch_zip

log = logging.getLogger("openelm_mlx")
HF_TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json")
HF_BIN_FILES = ("config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.model")
AUTO_MAP = {
    "AutoConfig": "apple/OpenELM-270M--configuration_openelm.OpenELMConfig",
    "AutoModelForCausalLM": "apple/OpenELM-270M--modeling_openelm.OpenELMForCausalLM",
}


@dataclass
class Source:
    """A checkpoint's tensors (lazy), its format, and the config and folder it came with."""

    tensors: dict[str, LazyTensor]
    format: str
    label: str
    folder: Path | None = None
    config: OpenELMConfig | None = None


@dataclass
class Report:
    output: Path
    tensors: int
    bytes_on_disk: int
    seconds: float
    dtype: str
    bits_per_weight: float | None = None
    float_layers: list[str] = dataclasses.field(default_factory=list)
    tokenizer: str | None = None


def _torch_state(path: Path) -> dict[str, LazyTensor]:
    obj = load_torch_zip(path)
    if isinstance(obj, dict) and "model_state_dict" in obj:  # CoreNet training_checkpoint_*.pt
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, LazyTensor):
            raise CheckpointError(f"{path}: entry {name!r:.80} is not a named tensor")
    return dict(obj)


def _read_file(path: Path) -> dict[str, LazyTensor]:
    require_regular_file(path)
    if path.name.endswith(".index.json"):
        shards = read_index(path)
        return merge_shards(sorted(set(shards.values())), _read_file, shards, path)[0]
    if path.suffix == ".safetensors":
        return open_safetensors(path)
    return _torch_state(path)


def open_source(src: str | Path) -> Source:
    """A local folder or file, or a Hub repo id (only the needed files are fetched)."""
    path = local_path(src)
    if path is None:
        path = download(str(src))
        if not any(path.glob("*.safetensors")):
            path = download(str(src), HF_BIN_FILES)
    if path.is_dir():
        candidates = [INDEX_FILE, "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"]
        found = [path / c for c in candidates if (path / c).exists()] or sorted(path.glob("model*.safetensors"))
        if not found:
            raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or shard index found")
        tensors, folder = _read_file(found[0]), path
    else:
        tensors, folder = _read_file(path), path.parent
    if any(name.endswith(".scales") for name in tensors):
        raise CheckpointError(f"{src}: already quantized; convert a float checkpoint, or `export` this one")
    config = read_config(folder)[0] if (folder / "config.json").exists() else None
    return Source(tensors, detect_format(list(tensors)), str(src), folder, config)


def _resize_vocab(tensors: dict[str, LazyTensor], rows: int) -> dict[str, LazyTensor]:
    out = dict(tensors)
    for name in ("transformer.token_embeddings.weight", "lm_head.weight"):
        if name in out and out[name].shape[0] != rows:
            t = out[name]
            if t.shape[0] < rows:
                raise CheckpointError(f"{t.source}: tensor {name!r} has {t.shape[0]} rows, fewer than vocab {rows}")
            out[name] = LazyTensor((rows, *t.shape[1:]), t.dtype, lambda t=t: t.load()[:rows], t.source)
    return out


def write_streaming(
    out: Path,
    tensors: dict[str, LazyTensor],
    dtype: mx.Dtype,
    max_bytes: int = MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors shard by shard, each read from the source and cast only when its shard is written."""
    itemsize = mx.zeros(0, dtype=dtype).itemsize
    sizes = {n: itemsize * math.prod(t.shape) for n, t in tensors.items()}
    write_shards(
        out, sizes, lambda names: {n: _finite(n, tensors[n]).astype(dtype) for n in names}, max_bytes, metadata
    )


def _finite(name: str, tensor: LazyTensor) -> mx.array:
    """The tensor, read; NaN or infinite weights make a model that prints garbage, so they are refused."""
    value = tensor.to_mx()
    if mx.issubdtype(value.dtype, mx.floating) and not mx.all(mx.isfinite(value)).item():
        raise CheckpointError(f"{tensor.source}: tensor {name!r} holds NaN or infinite values")
    return value


def _choose_dtype(requested: str | None, tensors: dict[str, LazyTensor], config: OpenELMConfig, force: bool) -> str:
    dtype = requested or tensors["transformer.token_embeddings.weight"].dtype
    if requested is None and dtype not in ("float32", "float16", "bfloat16"):
        dtype = "float32"  # e.g. a float64 source
    parse_dtype(dtype)
    if dtype == "float16" and config.is_3b_shaped and not force:
        raise OptionError("dtype", f"{FLOAT16_OVERFLOW}; use bfloat16, or force the conversion")
    return dtype


def _tokenizer_for(source: Source, tokenizer: str | None, chat: bool) -> Tokenizer | None:
    has_own = source.folder is not None and (source.folder / TOKENIZER_FILE).is_file()
    if tokenizer is None and not has_own:
        log.warning(
            "no tokenizer found (Apple's OpenELM repos ship none). Attach one now (the tokenizer setting: "
            "hf-internal-testing/llama-tokenizer, or a local tokenizer.model), or later by copying a "
            "tokenizer.model into the output folder."
        )
        return None
    return find_tokenizer(source.folder or Path("."), tokenizer, chat)


def _choose_vocab(
    tensors: dict[str, LazyTensor],
    config: OpenELMConfig,
    vocab_size: int | None,
    tok: Tokenizer | None,
) -> int:
    """`vocab_size`, else the tokenizer's size (dropping CoreNet's padding rows), else all rows."""
    if "transformer.token_embeddings.weight" not in tensors:
        sources = ", ".join(sorted({t.source for t in tensors.values()})) or "the checkpoint (it holds no tensors)"
        raise CheckpointError(f"{sources}: missing tensor 'transformer.token_embeddings.weight'")
    rows = tensors["transformer.token_embeddings.weight"].shape[0]
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= rows:
            raise OptionError(
                "vocab_size", f"must be between 1 and the checkpoint's {rows} embedding rows, got {vocab_size}"
            )
        if tok is not None and tok.vocab_size > vocab_size:
            raise OptionError("vocab_size", f"{vocab_size} is smaller than the tokenizer's {tok.vocab_size} pieces")
        return vocab_size
    if tok is not None and rows > tok.vocab_size:
        if tok.vocab_size < config.vocab_size:  # rows past the config's vocabulary are padding; these are not
            raise OptionError(
                "vocab_size",
                f"{tok.model_file} has {tok.vocab_size} pieces, fewer than the {config.vocab_size}-token vocabulary "
                f"of the checkpoint ({rows} embedding rows): give the vocabulary size to cut the embedding to "
                f"{tok.vocab_size} rows, or use the model's own tokenizer",
            )
        return tok.vocab_size
    if rows != config.vocab_size:
        log.warning(
            "keeping all %d embedding rows (padded vocabulary); give the vocabulary size or a tokenizer "
            "to drop the padding",
            rows,
        )
    return rows


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | None = None,
    tokenizer: str | None = None,
    arch: str | None = None,
    arch_config: str | Path | None = None,
    vocab_size: int | None = None,
    quantize: QuantizeOptions | None = None,
    force: bool = False,
    chat_template: bool | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Report:
    """Convert a Hugging Face or CoreNet checkpoint into an MLX model folder.

    `quantize`: quantize by round to nearest as these settings say (uniform, a recipe, embedding bits).
    `chat_template=None` records the Instruct template when the source or `arch` is named "Instruct".
    `force` allows float16 for 3B-shaped models and writing into a folder we did not create (only
    the files we write are replaced there).

    Raises:
        CheckpointError / OptionError / HubError: naming the file and tensor; nothing is written.
    """
    tic = time.perf_counter()
    check_output(dst, force, "model", (src,))  # before anything is downloaded or read
    if quantize is not None:
        check_rtn(quantize)  # calibrated methods read text: quantize the converted folder for those
    source = open_source(src)
    config = _source_config(source, arch, arch_config)
    tensors = map_state_dict(source.tensors, TABLES[source.format], source.label)
    chat = chat_template if chat_template is not None else uses_chat_template(None, f"{src} {arch or ''}")
    tok = _tokenizer_for(source, tokenizer, chat)
    vocab = _choose_vocab(tensors, config, vocab_size, tok)
    config = dataclasses.replace(config, vocab_size=vocab)
    tensors = _resize_vocab(tensors, vocab)
    if tok is not None:
        check_tokenizer(tok, config)
    check_weights(Model(config), tensors, {n: Path(t.source) for n, t in tensors.items()})
    out_dtype = _choose_dtype(dtype, tensors, config, force)
    report = Report(Path(dst), len(tensors), 0, 0.0, out_dtype, tokenizer=str(tok.model_file) if tok else None)
    with atomic_output_dir(dst, force=force, kind="model", inputs=(src,)) as tmp:
        write_streaming(tmp, tensors, parse_dtype(out_dtype), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": out_dtype}, indent=2))
        if quantize is not None:
            _quantize_in_place(tmp, quantize, max_shard_bytes, report)
        if tok is not None:
            tok.save(tmp)
            for name in HF_TOKENIZER_FILES:  # the source's fast-tokenizer files, for transformers users
                if source.folder is not None and (source.folder / name).is_file():
                    shutil.copyfile(source.folder / name, tmp / name)
        load_model(tmp, lazy=True)  # reload: every tensor's shape checked against the config
        report.bytes_on_disk = sum(f.stat().st_size for f in tmp.iterdir())
    report.seconds = time.perf_counter() - tic
    return report


def _source_config(source: Source, arch: str | None, arch_config: str | Path | None) -> OpenELMConfig:
    config = resolve_arch(arch, arch_config)
    if config is not None and source.config is not None and config != source.config:
        field = next(
            f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(source.config, f.name)
        )
        mine, theirs = getattr(config, field), getattr(source.config, field)
        raise OptionError(
            "arch" if arch else "arch_config",
            f"conflicts with {source.folder / 'config.json'}: {field} is {mine!r:.40} in the architecture given, "
            f"{theirs!r:.40} in config.json; leave the architecture out to use config.json",
        )
    if config is not None:
        return config
    if source.config is not None:
        return source.config
    raise ConfigError(
        f"{source.label}: no config.json beside the checkpoint; name the architecture (a released size such as "
        "OpenELM-270M, or an architecture file)"
    )


def _quantize_in_place(folder: Path, opts: QuantizeOptions, max_shard_bytes: int, report: Report) -> None:
    """Replace the float model in `folder` by its quantized version (config.json records the settings)."""
    model = load_model(folder, lazy=True)
    report.float_layers = quantize_rtn(model, opts)
    mx.eval(model.parameters())  # read everything before the float files go
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    write_weights(folder, dict(tree_flatten(model.parameters())), max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(model_config_dict(model), indent=2))
    report.bits_per_weight = bits_per_weight(model)


def export(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    force: bool = False,
) -> Report:
    """Write an MLX model folder back as a Hugging Face folder in Apple's format (dequantizing if needed).

    Names go through the inverse of the Hugging Face table, so export and import share one mapping.
    """
    from mlx_lm.utils import dequantize_model

    tic = time.perf_counter()
    check_output(dst, force, "hf-model", (src,))
    src = Path(src)
    model = load_model(src, lazy=True)
    if any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters())):
        model = dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    out_dtype = dtype or dtype_name(model.transformer.norm.weight.dtype)
    cast = parse_dtype(out_dtype)
    hf = {k: v.astype(cast) for k, v in map_state_dict(weights, invert(HF_TABLE), str(src)).items()}
    config = {
        **model.config.to_dict(),
        "torch_dtype": out_dtype,
        "auto_map": AUTO_MAP,
        "use_cache": True,
        "transformers_version": "4.39.3",
    }
    with atomic_output_dir(dst, force=force, kind="hf-model", inputs=(src,)) as tmp:
        write_weights(tmp, hf, max_shard_bytes, metadata={"format": "pt"})  # transformers wants "pt"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in (TOKENIZER_FILE, "tokenizer_config.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        size = sum(f.stat().st_size for f in tmp.iterdir())
    return Report(Path(dst), len(hf), size, time.perf_counter() - tic, out_dtype)
