"""The file-I/O shell of conversion: Hugging Face / CoreNet checkpoints -> MLX, and MLX -> Hugging Face.

Sources are read tensor by tensor and written shard by shard into a temporary folder, which is
reloaded and shape-checked before it is renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import mmap
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from openelm_mlx.errors import CheckpointError, ConfigError, OptionError, TokenizerNotFoundError
from openelm_mlx.folders.arch import resolve_arch
from openelm_mlx.folders.fs import (
    atomic_output_dir,
    atomic_output_file,
    check_output,
    check_output_file,
    require_regular_file,
)
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
from openelm_mlx.generation.template import JINJA
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


# --- GGUF (llama.cpp) ------------------------------------------------------------------------------


@dataclass
class GGUFReport:
    output: Path
    tensors: int
    bytes_on_disk: int
    seconds: float
    outtype: str
    dequantized: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)  # per-tensor fallbacks, never silent
    types: dict[str, int] = dataclasses.field(default_factory=dict)  # GGML type -> tensor count


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise OptionError("format", "gguf needs the `gguf` package: pip install 'gguf>=0.17'") from None


def export_gguf(
    src: str | Path,
    dst: str | Path,
    outtype: str = "f16",
    force: bool = False,
    name: str | None = None,
    *,
    beside_source: bool = False,
    option: str = "output",
) -> GGUFReport:
    """Write an MLX model folder as one GGUF file in llama.cpp's `openelm` layout, tokenizer embedded.

    `dst` may lie inside `src` only with `beside_source` (`fuse --export-gguf` into the folder it just wrote);
    `option` names `dst` in errors.

    A quantized model is dequantized first (the report says so). f32/f16/bf16/q8_0/q4_0 are written
    with the gguf package; q4_k_m and q6_k need llama.cpp's quantizer (`llama-cpp-python`).

    Raises:
        OptionError: unknown `outtype`, or an output file that would replace something (see
            `check_output_file`). TokenizerNotFoundError: the folder has no tokenizer.model.
        CheckpointError: a model llama.cpp cannot run, or a tokenizer it cannot take.
    """
    from mlx_lm.utils import dequantize_model

    from .gguf import NEEDS_LLAMA_CPP, OUTTYPES, choose_types, gguf_metadata, gguf_tensors, vocab_from_proto

    tic = time.perf_counter()
    if outtype not in OUTTYPES:
        raise OptionError("outtype", f"must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    _require_gguf()
    src = Path(src)
    dst = check_output_file(dst, force, [] if beside_source else [src], "inputs", "GGUF file", option)
    if OUTTYPES[outtype][0] in NEEDS_LLAMA_CPP:
        _llama_cpp(outtype)
    model = load_model(src, lazy=True)
    tok = find_tokenizer(src, None, None)
    check_tokenizer(tok, model.config)  # more pieces than embedding rows: names the tokenizer file
    dequantized = any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))
    if dequantized:
        model = dequantize_model(model)
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    tensors = gguf_tensors(weights, model.config, str(src))
    vocab = vocab_from_proto(tok.model_file.read_bytes(), str(tok.model_file))
    if tok.vocab_size < model.config.vocab_size:  # padded embedding rows: unused pieces, as llama.cpp's converter
        for i in range(tok.vocab_size, model.config.vocab_size):
            vocab.tokens.append(f"[PAD{i}]")
            vocab.scores.append(-1000.0)
            vocab.types.append(5)
    vocab.chat_template = JINJA if tok.chat_template else None
    base = "f32" if OUTTYPES[outtype][0] in NEEDS_LLAMA_CPP else outtype  # llama.cpp quantizes from f32
    meta = gguf_metadata(model.config, vocab, name or src.name, base)
    types, notes = choose_types(tensors, base)
    report = GGUFReport(dst, len(tensors), 0, 0.0, outtype, dequantized)
    with atomic_output_file(dst) as tmp:
        _write_gguf(tmp, meta, tensors, types)
        if base != outtype:
            _quantize_with_llama_cpp(tmp, outtype)
        report.types, report.notes = _read_back_types(tmp, outtype, notes)
    report.bytes_on_disk = dst.stat().st_size
    report.seconds = time.perf_counter() - tic
    return report


def _write_gguf(path: Path, meta: list, tensors: dict[str, np.ndarray], types: dict[str, str]) -> None:
    import gguf

    from .gguf import encode_tensor

    writer = gguf.GGUFWriter(path, meta[0][1])  # the architecture
    for key, value, kind in meta[1:]:
        item = kind.split(":")
        sub = gguf.GGUFValueType[item[1]] if len(item) == 2 else None
        writer.add_key_value(key, value, gguf.GGUFValueType[item[0]], sub_type=sub)
    for name, array in tensors.items():
        qtype = types[name]
        raw = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(name, encode_tensor(array, qtype), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_cpp(outtype: str):
    try:
        import llama_cpp
    except ImportError:
        raise OptionError(
            "outtype",
            f"{outtype} needs llama.cpp's quantizer (the gguf package cannot write K-quants): pip install "
            "llama-cpp-python, or export f16 and run llama-quantize",
        ) from None
    return llama_cpp


def _quantize_with_llama_cpp(path: Path, outtype: str) -> None:
    """Re-quantize the f32 file at `path` in place with llama.cpp's own quantizer (K-quant mixes)."""
    from .gguf import OUTTYPES

    llama_cpp = _llama_cpp(outtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = OUTTYPES[outtype][1]
    out = path.with_name(path.name + ".q")
    try:
        if llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), params) != 0:
            raise CheckpointError(f"{path}: llama.cpp could not quantize to {outtype}")
        os.replace(out, path)
    finally:
        out.unlink(missing_ok=True)


def _read_back_types(path: Path, outtype: str, notes: list[str]) -> tuple[dict[str, int], list[str]]:
    """Tensor count per GGML type in the written file, and the fallbacks: the gguf package's choice
    (`notes`) or, after llama.cpp's quantizer, every 2-D tensor it did not write as the asked type."""
    from .gguf import OUTTYPES

    header = read_gguf_header(path)
    counts: dict[str, int] = {}
    for t in header.tensors.values():
        counts[t.qtype] = counts.get(t.qtype, 0) + 1
    want = OUTTYPES[outtype][0]
    if want in ("Q4_K", "Q6_K"):
        notes = [
            f"{t.name}: written by llama.cpp as {t.qtype}"
            + (f" (width {t.shape[-1]} is not a multiple of 256)" if t.shape[-1] % 256 else " (its K-quant mix)")
            for t in header.tensors.values()
            if len(t.shape) > 1 and t.qtype != want
        ]
    return counts, notes


def read_gguf_header(path: str | Path):
    """A GGUF file's metadata and tensor directory, validated against the file's real size."""
    from .gguf import parse_header

    _require_gguf()
    path = require_regular_file(Path(path))
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CheckpointError(f"{path}: empty file (not GGUF)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return parse_header(view, str(path))
            finally:
                view.release()


def _gguf_lazy(path: Path, header) -> dict[str, LazyTensor]:
    from .gguf import decode_tensor

    out = {}
    for name, t in header.tensors.items():
        dtype = {"F16": "float16", "BF16": "bfloat16"}.get(t.qtype, "float32")

        def load(t=t) -> np.ndarray:
            raw = np.array(np.memmap(path, dtype=np.uint8, mode="r", offset=t.start, shape=(t.nbytes,)))
            return np.ascontiguousarray(decode_tensor(raw, t))

        out[name] = LazyTensor(t.shape, dtype, load, str(path))
    return out


def import_gguf(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    tokenizer: str | None = None,
    force: bool = False,
    chat_template: bool | None = None,
) -> Report:
    """Convert a llama.cpp `openelm` GGUF into an MLX model folder (quantized tensors dequantized),
    with a tokenizer.model rebuilt from the file's vocabulary (or `tokenizer`, when it cannot be exact).

    Raises:
        CheckpointError: another architecture (named), or a field, count, shape or offset that the
            file's bytes contradict. TokenizerNotFoundError: the vocabulary cannot be rebuilt exactly.
    """
    from .gguf import config_from_header, mlx_state, proto_from_vocab, vocab_from_header

    tic = time.perf_counter()
    check_output(dst, force, "model", (src,))
    path = Path(src)
    header = read_gguf_header(path)
    embedding = header.tensors.get("token_embd.weight")
    if header.metadata.get("general.architecture") == "openelm" and embedding is None:
        raise CheckpointError(f"{path}: missing tensor 'token_embd.weight'")
    config = config_from_header(header, embedding.shape[0] if embedding else 1, str(path))
    tensors = mlx_state(_gguf_lazy(path, header), str(path))
    check_weights(Model(config), tensors, {n: path for n in tensors})
    vocab = None
    if tokenizer is None:
        try:
            vocab = vocab_from_header(header, str(path))
            model_bytes = proto_from_vocab(vocab, str(path))
        except CheckpointError as e:
            raise TokenizerNotFoundError(f"{e}; give the tokenizer to use") from None
    chat = chat_template if chat_template is not None else bool(vocab and vocab.chat_template)
    quantized = any(t.qtype not in ("F32", "F16", "BF16") for t in header.tensors.values())
    out_dtype = dtype or ("float32" if quantized else tensors["transformer.token_embeddings.weight"].dtype)
    _choose_dtype(out_dtype, tensors, config, force)
    report = Report(Path(dst), len(tensors), 0, 0.0, out_dtype)
    with atomic_output_dir(dst, force=force, kind="model", inputs=(src,)) as tmp:
        write_streaming(tmp, tensors, parse_dtype(out_dtype))
        (tmp / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": out_dtype}, indent=2))
        if vocab is not None:
            (tmp / TOKENIZER_FILE).write_bytes(model_bytes)
            tok = Tokenizer(tmp / TOKENIZER_FILE, chat)
            _check_rebuilt(tok, vocab, path)
        else:
            tok = find_tokenizer(Path("."), tokenizer, chat)
        check_tokenizer(tok, config)
        tok.save(tmp)
        report.tokenizer = "rebuilt from the GGUF vocabulary" if vocab is not None else str(tok.model_file)
        load_model(tmp, lazy=True)
        report.bytes_on_disk = sum(f.stat().st_size for f in tmp.iterdir())
    report.seconds = time.perf_counter() - tic
    return report


def _check_rebuilt(tok: Tokenizer, vocab, path: Path) -> None:
    """The rebuilt model holds every GGUF piece at its id, with its type (SentencePiece may drop or merge some)."""
    sp = tok.sp
    if sp.get_piece_size() != len(vocab.tokens):
        raise TokenizerNotFoundError(
            f"{path}: the rebuilt tokenizer has {sp.get_piece_size()} pieces, not {len(vocab.tokens)}"
        )
    for i, piece in enumerate(vocab.tokens):
        if sp.id_to_piece(i) != piece:
            raise TokenizerNotFoundError(f"{path}: token {i} ({piece[:40]!r}) did not survive the rebuild")


def is_gguf(src: str | Path) -> bool:
    """True when `src` is a regular file that starts with GGUF's magic bytes (its content decides, not its name)."""
    path = Path(src)
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
