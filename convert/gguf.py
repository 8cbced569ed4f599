"""GGUF in llama.cpp's `openelm` layout, both ways, as pure functions: (state dict, config, vocabulary)
to the metadata and tensors of a GGUF file, and a GGUF file's bytes back to them.

The reader parses the header itself (nothing from `gguf.GGUFReader`, which trusts the file): every
count, length, type, shape and offset is checked against the buffer's real size before it is used.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openelm_mlx.errors import CheckpointError, ConfigError, OptionError
from openelm_mlx.model.config import PRESETS, OpenELMConfig

from .tables import map_state_dict
from .tensors import LazyTensor

ARCH = "openelm"
MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 256  # llama.cpp allows 64 bytes; a little slack, never megabytes
MAX_KEY = 65536
MAX_DEPTH = 2  # arrays of arrays at most (no OpenELM key uses even that)

# GGUF tensor name -> MLX name. `proj_1` is stored split in llama.cpp, so its two halves have names
# of their own here (`.gate`, `.up`); `split_glu` / `join_glu` turn them into `proj_1` and back.
GGUF_TABLE: dict[str, str | None] = {
    "token_embd.weight": "transformer.token_embeddings.weight",
    "output_norm.weight": "transformer.norm.weight",
    "blk.{}.attn_norm.weight": "transformer.layers.{}.attn_norm.weight",
    "blk.{}.attn_qkv.weight": "transformer.layers.{}.attn.qkv_proj.weight",
    "blk.{}.attn_q_norm.weight": "transformer.layers.{}.attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "transformer.layers.{}.attn.k_norm.weight",
    "blk.{}.attn_output.weight": "transformer.layers.{}.attn.out_proj.weight",
    "blk.{}.ffn_norm.weight": "transformer.layers.{}.ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "transformer.layers.{}.ffn.proj_1.gate",
    "blk.{}.ffn_up.weight": "transformer.layers.{}.ffn.proj_1.up",
    "blk.{}.ffn_down.weight": "transformer.layers.{}.ffn.proj_2.weight",
}

# --outtype -> (the GGML type of 2-D weights, llama.cpp's file type number); norms always stay F32.
OUTTYPES: dict[str, tuple[str, int]] = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "bf16": ("BF16", 32),
    "q8_0": ("Q8_0", 7),
    "q4_0": ("Q4_0", 2),
    "q4_k_m": ("Q4_K", 15),
    "q6_k": ("Q6_K", 18),
}
# llama.cpp's per-tensor fallback when a row is not a whole number of blocks (llama-quant.cpp).
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0", "Q8_0": "F16", "Q4_0": "F16", "Q5_0": "F16"}
NEEDS_LLAMA_CPP = ("Q4_K", "Q6_K")  # the gguf package reads these but cannot write them

# GGUF value types: number -> struct format (None: string 8, array 9).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# SentencePiece piece types equal GGUF token types: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
TOKEN_TYPES = range(1, 7)


@dataclass
class Vocab:
    """A SentencePiece vocabulary as llama.cpp's `llama` tokenizer metadata holds it."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    add_space_prefix: bool = True
    chat_template: str | None = None


@dataclass
class GGUFTensor:
    """One tensor of a parsed file: numpy shape (slowest axis first), GGML type name, absolute byte range."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    start: int
    nbytes: int


@dataclass
class GGUFHeader:
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)


# --- export: MLX -> GGUF -----------------------------------------------------------------------------


def check_exportable(config: OpenELMConfig) -> None:
    """llama.cpp's loader knows only tied, GLU, q/k-normed OpenELMs (every released one).

    Raises:
        CheckpointError: naming the setting llama.cpp cannot run.
    """
    for name, want in (("share_input_output_layers", True), ("ffn_with_glu", True), ("normalize_qk_projections", True)):
        if getattr(config, name) is not want:
            raise CheckpointError(f"{name}={getattr(config, name)}: llama.cpp's openelm loader needs {want}")


def split_glu(state: Mapping[str, np.ndarray], config: OpenELMConfig) -> dict[str, np.ndarray]:
    """`proj_1` ([gate | up] rows) as its two halves, under the names GGUF_TABLE gives them."""
    out = dict(state)
    for i, width in enumerate(config.intermediate_sizes):
        fused = out.pop(f"transformer.layers.{i}.ffn.proj_1.weight")
        out[f"transformer.layers.{i}.ffn.proj_1.gate"] = fused[:width]
        out[f"transformer.layers.{i}.ffn.proj_1.up"] = fused[width:]
    return out


def join_glu(state: Mapping[str, LazyTensor], source: str) -> dict[str, LazyTensor]:
    """The inverse of `split_glu`: gate and up rows back into one `proj_1`, read when it is read."""
    out = dict(state)
    for name in [n for n in state if n.endswith(".proj_1.gate")]:
        prefix = name.removesuffix(".gate")
        if prefix + ".up" not in out:
            raise CheckpointError(f"{source}: {name} has no matching ffn_up tensor")
        gate, up = out.pop(name), out.pop(prefix + ".up")
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise CheckpointError(f"{source}: {prefix}: ffn_gate {gate.shape} and ffn_up {up.shape} differ")
        shape = (2 * gate.shape[0], *gate.shape[1:])
        out[prefix + ".weight"] = LazyTensor(
            shape, gate.dtype, lambda g=gate, u=up: np.concatenate([g.load(), u.load()]), source
        )
    if any(n.endswith(".proj_1.up") for n in out):
        raise CheckpointError(f"{source}: an ffn_up tensor has no matching ffn_gate")
    return out


def gguf_tensors(state: Mapping[str, np.ndarray], config: OpenELMConfig, source: str) -> dict[str, np.ndarray]:
    """MLX float state dict -> GGUF names (llama.cpp's order: embedding, layers, final norm)."""
    check_exportable(config)
    inverse = {dst: src for src, dst in GGUF_TABLE.items() if dst is not None}
    return map_state_dict(split_glu(state, config), inverse, source)


def choose_types(tensors: Mapping[str, np.ndarray], outtype: str) -> tuple[dict[str, str], list[str]]:
    """The GGML type of each tensor for `outtype`, and one line per fallback (never silent).

    1-D tensors (norms) stay F32, as llama.cpp keeps them. A quantized type whose block does not
    divide a tensor's row width falls back per tensor as llama.cpp does (FALLBACK, then F16).

    Raises:
        OptionError: `outtype` unknown.
    """
    import gguf

    if outtype not in OUTTYPES:
        raise OptionError("outtype", f"must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    want = OUTTYPES[outtype][0]
    types, notes = {}, []
    for name, array in tensors.items():
        if array.ndim == 1:
            types[name] = "F32"
            continue
        qtype, width = want, array.shape[-1]
        while width % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]:
            qtype = FALLBACK[qtype]
        if qtype != want:
            notes.append(f"{name}: width {width} is not a multiple of {want}'s block, written as {qtype}")
        types[name] = qtype
    return types, notes


def encode_tensor(array: np.ndarray, qtype: str) -> np.ndarray:
    """`array` (float32) in GGML type `qtype`, as the gguf package lays it out (bytes for block types)."""
    import gguf

    if qtype == "F32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == "F16":
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.asarray(array, dtype=np.float32), gguf.GGMLQuantizationType[qtype])


def gguf_metadata(config: OpenELMConfig, vocab: Vocab, name: str, outtype: str) -> list[tuple[str, Any, str]]:
    """(key, value, GGUF value type name) in llama.cpp's layout; arrays say their item type as 'ARRAY:INT32'.

    Raises:
        CheckpointError: the vocabulary does not match the embedding rows or has pieces llama.cpp cannot take.
    """
    n_tokens = len(vocab.tokens)
    if n_tokens != config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {n_tokens} pieces but the model has {config.vocab_size} embedding rows; "
            "llama.cpp needs one piece per row"
        )
    arch = ARCH
    meta = [
        ("general.architecture", arch, "STRING"),
        ("general.name", name, "STRING"),
        ("general.file_type", OUTTYPES[outtype][1], "UINT32"),
        ("general.quantization_version", 2, "UINT32"),
        (f"{arch}.block_count", config.num_transformer_layers, "UINT32"),
        (f"{arch}.context_length", config.max_context_length, "UINT32"),
        (f"{arch}.embedding_length", config.model_dim, "UINT32"),
        (f"{arch}.feed_forward_length", list(config.intermediate_sizes), "ARRAY:INT32"),
        (f"{arch}.attention.head_count", list(config.num_query_heads), "ARRAY:INT32"),
        (f"{arch}.attention.head_count_kv", list(config.num_kv_heads), "ARRAY:INT32"),
        (f"{arch}.rope.freq_base", float(config.rope_freq_constant), "FLOAT32"),
        (f"{arch}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), "FLOAT32"),
        (f"{arch}.rope.dimension_count", config.head_dim, "UINT32"),
        (f"{arch}.attention.key_length", config.head_dim, "UINT32"),
        (f"{arch}.attention.value_length", config.head_dim, "UINT32"),
        ("tokenizer.ggml.model", "llama", "STRING"),
        ("tokenizer.ggml.pre", "default", "STRING"),
        ("tokenizer.ggml.tokens", vocab.tokens, "ARRAY:STRING"),
        ("tokenizer.ggml.scores", vocab.scores, "ARRAY:FLOAT32"),
        ("tokenizer.ggml.token_type", vocab.types, "ARRAY:INT32"),
        ("tokenizer.ggml.bos_token_id", vocab.bos_id, "UINT32"),
        ("tokenizer.ggml.eos_token_id", vocab.eos_id, "UINT32"),
        ("tokenizer.ggml.unknown_token_id", vocab.unk_id, "UINT32"),
        ("tokenizer.ggml.add_bos_token", True, "BOOL"),
        ("tokenizer.ggml.add_eos_token", False, "BOOL"),
        ("tokenizer.ggml.add_space_prefix", vocab.add_space_prefix, "BOOL"),
    ]
    if vocab.chat_template:
        meta.append(("tokenizer.chat_template", vocab.chat_template, "STRING"))
    return meta


def vocab_from_proto(data: bytes, source: str) -> Vocab:
    """The vocabulary of a SentencePiece `tokenizer.model` (its ModelProto bytes).

    Raises:
        CheckpointError: not a BPE model without normalization rules (llama.cpp's `llama` tokenizer
            would split text differently).
    """
    proto = _parse_proto(data, source)
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise CheckpointError(f"{source}: a non-BPE SentencePiece model; llama.cpp's 'llama' tokenizer is BPE")
    if proto.normalizer_spec.precompiled_charsmap or proto.normalizer_spec.name not in ("identity", ""):
        raise CheckpointError(f"{source}: normalizes text ({proto.normalizer_spec.name}); llama.cpp would not")
    spec = proto.trainer_spec
    return Vocab(
        tokens=[p.piece for p in proto.pieces],
        scores=[p.score for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces],
        bos_id=spec.bos_id,
        eos_id=spec.eos_id,
        unk_id=spec.unk_id,
        add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
    )


def _parse_proto(data: bytes, source: str) -> Any:
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as e:
        raise CheckpointError(f"{source}: not a SentencePiece model ({e})") from None
    return proto


def proto_from_vocab(vocab: Vocab, source: str) -> bytes:
    """A SentencePiece `tokenizer.model` that tokenizes as the GGUF's `llama` vocabulary does:
    BPE over the pieces and scores, byte fallback when byte pieces exist, no normalization.

    Raises:
        CheckpointError: a vocabulary this cannot rebuild exactly (duplicate or empty pieces,
            unknown token types, special ids out of range), naming the first offender.
    """
    from sentencepiece import sentencepiece_model_pb2

    n = len(vocab.tokens)
    if not (len(vocab.scores) == len(vocab.types) == n):
        raise CheckpointError(f"{source}: {n} tokens but {len(vocab.scores)} scores and {len(vocab.types)} types")
    seen: set[str] = set()
    for i, (piece, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        if kind not in TOKEN_TYPES or not piece or piece in seen:
            raise CheckpointError(
                f"{source}: token {i} ({piece[:40]!r}, type {kind}) cannot be rebuilt as a SentencePiece piece"
            )
        seen.add(piece)
    for what, idx, kind in (("bos", vocab.bos_id, 3), ("eos", vocab.eos_id, 3), ("unknown", vocab.unk_id, 2)):
        if not 0 <= idx < n or vocab.types[idx] != kind:
            raise CheckpointError(f"{source}: tokenizer.ggml.{what}_token_id {idx} is not a special token")
    proto = sentencepiece_model_pb2.ModelProto()
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size = spec.BPE, n
    spec.byte_fallback = 6 in vocab.types
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = vocab.unk_id, vocab.bos_id, vocab.eos_id, -1
    spec.unk_piece, spec.bos_piece, spec.eos_piece = (
        vocab.tokens[i] for i in (vocab.unk_id, vocab.bos_id, vocab.eos_id)
    )
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces = "identity", vocab.add_space_prefix, False
    norm.escape_whitespaces = True
    for piece, score, kind in zip(vocab.tokens, vocab.scores, vocab.types):
        proto.pieces.add(piece=piece, score=float(score), type=kind)
    return proto.SerializeToString()


# --- import: GGUF -> MLX -----------------------------------------------------------------------------


class _Cursor:
    """Reads little-endian GGUF fields from `buf`, refusing any length that runs past its end."""

    def __init__(self, buf: memoryview, source: str):
        self.buf, self.pos, self.source = buf, 0, source

    def fail(self, what: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {what}: {problem}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > len(self.buf) - self.pos:
            raise self.fail(what, f"needs {n} bytes at offset {self.pos}, past the end of the file (truncated?)")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.scalar("Q", what)
        if limit is not None and length > limit:
            raise self.fail(what, f"is {length} bytes long (at most {limit})")
        raw = self.take(length, f"{what} (a string of {length} bytes)")
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(what, "is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY or depth >= MAX_DEPTH:
            raise self.fail(what, f"unknown value type {vtype}" if vtype != _ARRAY else "arrays nested too deep")
        item, count = self.scalar("I", what), self.scalar("Q", what)
        if item in _SCALARS:
            size = struct.calcsize(_SCALARS[item])
            if count > (len(self.buf) - self.pos) // size:
                raise self.fail(what, f"an array of {count} items of type {item} runs past the end of the file")
            raw = self.take(count * size, what)
            return np.frombuffer(raw, dtype=np.dtype("<" + _SCALARS[item])).tolist()
        min_size = 8 if item == _STRING else 12  # a string's length field; an array's type and count
        if item not in (_STRING, _ARRAY):
            raise self.fail(what, f"an array of unknown item type {item}")
        if count > (len(self.buf) - self.pos) // min_size:
            raise self.fail(what, f"an array of {count} items of type {item} runs past the end of the file")
        return [self.value(item, f"{what}[{i}]", depth + 1) for i in range(count)]


def parse_header(buf: memoryview, source: str) -> GGUFHeader:
    """Metadata and tensor directory of a GGUF file, every field checked against `len(buf)`.

    Raises:
        CheckpointError: naming `source` and the field or tensor that is wrong.
    """
    import gguf

    cur = _Cursor(buf, source)
    if bytes(cur.take(4, "magic")) != MAGIC:
        raise CheckpointError(f"{source}: not a GGUF file (no 'GGUF' magic)")
    version = cur.scalar("I", "version")
    if version not in (2, 3):
        raise CheckpointError(f"{source}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.scalar("Q", "tensor count"), cur.scalar("Q", "metadata count")
    left = len(buf) - cur.pos
    if n_kv > left // 13:  # key length 8 + type 4 + at least 1 byte of value
        raise CheckpointError(f"{source}: claims {n_kv} metadata entries, more than its {len(buf)} bytes can hold")
    if n_tensors > left // 24:  # name length 8 + dims count 4 + type 4 + offset 8
        raise CheckpointError(f"{source}: claims {n_tensors} tensors, more than its {len(buf)} bytes can describe")
    header = GGUFHeader()
    for i in range(n_kv):
        key = cur.string(f"metadata entry {i} key", MAX_KEY)
        if key in header.metadata:
            raise CheckpointError(f"{source}: metadata key {key[:80]!r} appears twice")
        header.metadata[key] = cur.value(cur.scalar("I", f"metadata {key[:80]!r} type"), f"metadata {key[:80]!r}")
    infos = [_tensor_info(cur, i, gguf) for i in range(n_tensors)]
    alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise CheckpointError(f"{source}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    end = data_start
    for name, shape, qtype, offset, nbytes in sorted(infos, key=lambda t: t[3]):
        if name in header.tensors:
            raise CheckpointError(f"{source}: tensor {name!r} appears twice")
        if offset % alignment or data_start + offset < end or data_start + offset + nbytes > len(buf):
            raise CheckpointError(
                f"{source}: tensor {name!r}: its {nbytes} bytes at offset {offset} lie outside the file's data "
                f"({len(buf) - data_start} bytes), overlap another tensor or are misaligned"
            )
        end = data_start + offset + nbytes
        header.tensors[name] = GGUFTensor(name, shape, qtype, data_start + offset, nbytes)
    return header


def _tensor_info(cur: _Cursor, i: int, gguf: Any) -> tuple[str, tuple[int, ...], str, int, int]:
    name = cur.string(f"tensor {i} name", MAX_NAME)
    n_dims = cur.scalar("I", f"tensor {name!r} dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r}", f"has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = [cur.scalar("Q", f"tensor {name!r} shape") for _ in range(n_dims)]
    type_id, offset = cur.scalar("I", f"tensor {name!r} type"), cur.scalar("Q", f"tensor {name!r} offset")
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r}", f"unknown tensor type {type_id}") from None
    count = math.prod(dims)
    if min(dims) < 1 or dims[0] % block or count > len(cur.buf) * block:  # a block is at least one byte
        raise cur.fail(f"tensor {name!r}", f"shape {dims} does not fit type {qtype.name} or the file's size")
    return name, tuple(reversed(dims)), qtype.name, offset, count // block * type_size


def decode_tensor(raw: np.ndarray, tensor: GGUFTensor) -> np.ndarray:
    """A tensor's bytes as float32 (F16 and BF16 as themselves), dequantized with the gguf package."""
    import gguf

    if tensor.qtype == "F32":
        return raw.view("<f4").reshape(tensor.shape)
    if tensor.qtype == "F16":
        return raw.view("<f2").reshape(tensor.shape)
    qtype = gguf.GGMLQuantizationType[tensor.qtype]
    rows = raw.reshape(*tensor.shape[:-1], -1)
    if tensor.qtype == "BF16":
        return rows.view("<u2").reshape(tensor.shape)  # held as uint16 bytes, like LazyTensor
    return gguf.quants.dequantize(rows, qtype).reshape(tensor.shape)


def _meta(header: GGUFHeader, key: str, kind: type, source: str, default: Any = None) -> Any:
    value = header.metadata.get(key, default)
    if value is None:
        raise ConfigError(f"{source}: missing metadata {key!r}")
    ok = all(
        type(v) in (int, float) if kind is float else type(v) is kind
        for v in (value if isinstance(value, list) else [value])
    )
    if not ok:
        raise ConfigError(f"{source}: metadata {key!r} must be {kind.__name__}, got {str(value)[:80]}")
    return value


def _per_layer(header: GGUFHeader, key: str, n: int, source: str) -> list[int]:
    value = _meta(header, key, int, source)
    values = value if isinstance(value, list) else [value] * n
    if len(values) != n:
        raise ConfigError(f"{source}: metadata {key!r} has {len(values)} values for {n} layers")
    return values


def config_from_header(header: GGUFHeader, vocab_size: int, source: str) -> OpenELMConfig:
    """The OpenELMConfig a llama.cpp `openelm` file describes (a released size's own when it matches one).

    Raises:
        CheckpointError: another architecture (named), or metadata missing, mistyped or inconsistent.
    """
    arch = header.metadata.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{source}: a GGUF of architecture {str(arch)[:40]!r}, not OpenELM ('openelm')")
    a = ARCH
    n = _meta(header, f"{a}.block_count", int, source)
    if not 1 <= n <= 1024:
        raise ConfigError(f"{source}: metadata '{a}.block_count' {n} is out of range")
    dim = _meta(header, f"{a}.embedding_length", int, source)
    head_dim = _meta(header, f"{a}.attention.key_length", int, source)
    for key in ("attention.value_length", "rope.dimension_count"):
        if _meta(header, f"{a}.{key}", int, source, head_dim) != head_dim:
            raise ConfigError(f"{source}: metadata '{a}.{key}' differs from key_length {head_dim} (not OpenELM)")
    q, kv = (
        _per_layer(header, f"{a}.attention.head_count", n, source),
        _per_layer(header, f"{a}.attention.head_count_kv", n, source),
    )
    widths = _per_layer(header, f"{a}.feed_forward_length", n, source)
    if min(widths + [dim]) < 1:
        raise ConfigError(f"{source}: metadata holds a width below 1")
    divisor = math.gcd(*widths)
    fields = dict(
        num_transformer_layers=n,
        model_dim=dim,
        head_dim=head_dim,
        num_query_heads=q,
        num_kv_heads=kv,
        ffn_multipliers=[w / dim for w in widths],
        ffn_dim_divisor=divisor,
        num_gqa_groups=q[0] // kv[0] if kv[0] and all(h * kv[0] == k * q[0] for h, k in zip(q, kv)) else 1,
        vocab_size=vocab_size,
        max_context_length=_meta(header, f"{a}.context_length", int, source),
        rope_freq_constant=_meta(header, f"{a}.rope.freq_base", float, source, 10000.0),
        rms_norm_eps=_meta(header, f"{a}.attention.layer_norm_rms_epsilon", float, source, 1e-6),
        bos_token_id=_meta(header, "tokenizer.ggml.bos_token_id", int, source, 1),
        eos_token_id=_meta(header, "tokenizer.ggml.eos_token_id", int, source, 2),
    )
    fields["rope_max_length"] = 2 * fields["max_context_length"]  # Apple's ratio; RoPE needs no table here
    try:
        config = _released_or(OpenELMConfig.from_dict(fields))
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    if list(config.intermediate_sizes) != widths:
        raise ConfigError(f"{source}: feed_forward_length {widths} cannot be expressed as OpenELM widths")
    return config


_SHAPES = ("num_transformer_layers", "model_dim", "head_dim", "num_query_heads", "num_kv_heads", "intermediate_sizes")
_KEPT = ("vocab_size", "max_context_length", "rope_max_length", "rope_freq_constant", "rms_norm_eps")


def _released_or(config: OpenELMConfig) -> OpenELMConfig:
    """The released size with these per-layer shapes (config.json keeps Apple's multipliers), else `config`."""
    for preset in PRESETS:
        kept = {k: getattr(config, k) for k in (*_KEPT, "bos_token_id", "eos_token_id")}
        released = OpenELMConfig.from_preset(preset, **kept)
        if all(getattr(released, k) == getattr(config, k) for k in _SHAPES):
            return released
    return config


def vocab_from_header(header: GGUFHeader, source: str) -> Vocab:
    """The `llama` (SentencePiece) vocabulary the file embeds.

    Raises:
        CheckpointError: no vocabulary, another tokenizer model, or arrays that disagree.
    """
    model = header.metadata.get("tokenizer.ggml.model")
    if model != "llama":
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model is {str(model)[:40]!r}, not 'llama' (SentencePiece); it cannot be "
            "rebuilt as a tokenizer.model exactly"
        )
    if "tokenizer.ggml.precompiled_charsmap" in header.metadata:
        raise CheckpointError(
            f"{source}: the tokenizer normalizes text (precompiled_charsmap); it cannot be rebuilt exactly"
        )
    tokens = _meta(header, "tokenizer.ggml.tokens", str, source)
    n = len(tokens) if isinstance(tokens, list) else -1
    scores = _meta(header, "tokenizer.ggml.scores", float, source, [0.0] * max(n, 0))
    types = _meta(header, "tokenizer.ggml.token_type", int, source, [1] * max(n, 0))
    if not isinstance(tokens, list) or not isinstance(scores, list) or not isinstance(types, list):
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens, scores and token_type must be arrays")
    return Vocab(
        tokens=tokens,
        scores=[float(s) for s in scores],
        types=types,
        bos_id=_meta(header, "tokenizer.ggml.bos_token_id", int, source, 1),
        eos_id=_meta(header, "tokenizer.ggml.eos_token_id", int, source, 2),
        unk_id=_meta(header, "tokenizer.ggml.unknown_token_id", int, source, 0),
        add_space_prefix=_meta(header, "tokenizer.ggml.add_space_prefix", bool, source, True),
        chat_template=header.metadata.get("tokenizer.chat_template")
        if isinstance(header.metadata.get("tokenizer.chat_template"), str)
        else None,
    )


def mlx_state(tensors: Mapping[str, LazyTensor], source: str) -> dict[str, LazyTensor]:
    """GGUF-named arrays -> MLX names (`proj_1` joined); unknown tensors raise naming them."""
    return join_glu(map_state_dict(tensors, GGUF_TABLE, source), source)
