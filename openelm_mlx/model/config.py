"""OpenELM architecture config: one frozen dataclass, Apple's field names, layer-wise scaling.

Per-layer sizes (query/KV heads, FFN widths) are computed here once, never inside modules.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from numbers import Number
from typing import Any

import numpy as np

# config.json fields that carry no architecture (HF/mlx-lm bookkeeping, or derived here); any other
# unknown field is reported once, since it may change the model in a way this code ignores.
KNOWN_EXTRA_KEYS = frozenset(
    {
        "model_type",
        "activation_fn_name",
        "normalization_layer_name",
        "architectures",
        "auto_map",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_cache",
        "initializer_range",
        "quantization",
        "quantization_config",
        "_name_or_path",
        "tie_word_embeddings",
        "num_kv_heads",
        "num_query_heads",
        "pad_token_id",
        "chat_template",
    }
)
MAX_LAYERS = 1024  # far above any released size; bounds what a hostile config can make us allocate

PRESETS: dict[str, dict[str, Any]] = {
    "OpenELM-270M": dict(num_transformer_layers=16, model_dim=1280, head_dim=64),
    "OpenELM-450M": dict(num_transformer_layers=20, model_dim=1536, head_dim=64),
    "OpenELM-1_1B": dict(num_transformer_layers=28, model_dim=2048, head_dim=64),
    "OpenELM-3B": dict(num_transformer_layers=36, model_dim=3072, head_dim=128),
}
_PRESET_COMMON = dict(
    num_gqa_groups=4,
    qkv_multipliers=(0.5, 1.0),
    ffn_multipliers=(0.5, 4.0),
    ffn_dim_divisor=256,
    vocab_size=32000,
    max_context_length=2048,
    rope_max_length=4096,
    rope_freq_constant=10000,
    normalize_qk_projections=True,
    share_input_output_layers=True,
    ffn_with_glu=True,
)

FLOAT16_OVERFLOW = "float16 overflows in 3B-shaped OpenELMs (activations reach the hundreds of thousands)"


def make_divisible(v: float, divisor: int) -> int:
    """Round `v` to a multiple of `divisor`, never more than 10% below `v` (Apple's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def _scaled(spec: float | list[float] | tuple[float, ...], n_layers: int, name: str, per_layer: bool) -> list[float]:
    """Expand a multiplier spec (scalar, [min, max], or L values when `per_layer`) to L values.

    As in Apple's code, a two-element list is always a [min, max] range, even when L == 2.
    """
    if isinstance(spec, Number) and not isinstance(spec, bool):
        return [float(spec)] * n_layers
    spec = list(spec)
    if len(spec) == 2:
        return [round(float(v), 2) for v in np.linspace(spec[0], spec[1], num=n_layers, dtype=np.float64)]
    if per_layer and len(spec) == n_layers:
        return [float(v) for v in spec]
    allowed = f"[min, max] or {n_layers} values (one per layer)" if per_layer else "[min, max]"
    raise ValueError(f"{name} must be a number or {allowed}, got {spec}")


@dataclass(frozen=True)
class OpenELMConfig:
    """Everything Apple's config.json holds about the architecture.

    Build it with `from_dict` (a Hugging Face / CoreNet config dict), `from_preset`
    (e.g. "OpenELM-270M-Instruct") or `from_layerwise` (custom layer-wise scaling).
    """

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    num_query_heads: tuple[int, ...]
    num_kv_heads: tuple[int, ...]
    ffn_multipliers: tuple[float, ...]
    num_gqa_groups: int = 1
    qkv_multipliers: tuple[float, ...] = (1.0,)
    ffn_dim_divisor: int = 256
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    vocab_size: int = 32000
    max_context_length: int = 2048
    rope_freq_constant: float = 10000
    rope_max_length: int = 4096
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 1
    eos_token_id: int = 2
    intermediate_sizes: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        _check_types(self)
        n = self.num_transformer_layers
        if n < 1 or self.model_dim < 1 or self.head_dim < 1 or self.vocab_size < 1:
            raise ValueError("num_transformer_layers, model_dim, head_dim and vocab_size must be positive")
        if n > MAX_LAYERS:
            raise ValueError(f"num_transformer_layers {n} is more than {MAX_LAYERS}")
        if not 0 < self.rms_norm_eps < 1:
            raise ValueError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary of {self.vocab_size}")
        for name in ("max_context_length", "rope_max_length", "ffn_dim_divisor", "num_gqa_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.rope_freq_constant > 0:
            raise ValueError(f"rope_freq_constant must be positive, got {self.rope_freq_constant}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} values but num_transformer_layers is {n}")
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if kv < 1 or q < 1 or q % kv:
                raise ValueError(f"layer {i}: {q} query heads are not divisible by {kv} KV heads")
        sizes = tuple(make_divisible(m * self.model_dim, self.ffn_dim_divisor) for m in self.ffn_multipliers)
        object.__setattr__(self, "intermediate_sizes", sizes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpenELMConfig:
        """Build from a Hugging Face config.json dict (or CoreNet GPTConfig field names).

        Stored per-layer lists (`num_query_heads`, `num_kv_heads`, `ffn_multipliers`) are used
        when present; otherwise they are derived with Apple's layer-wise scaling rules.

        Raises:
            ValueError: unknown model_type, unsupported activation/normalization, bad shapes.
        """
        model_type = d.get("model_type", "openelm")
        if model_type != "openelm":
            raise ValueError(f"model_type {model_type!r} is not an OpenELM model (expected 'openelm')")
        if d.get("activation_fn_name", "swish") not in ("swish", "silu"):
            raise ValueError(f"activation_fn_name {d['activation_fn_name']!r} is not supported (OpenELM uses 'swish')")
        if d.get("normalization_layer_name", "rms_norm") != "rms_norm":
            raise ValueError(f"normalization_layer_name {d['normalization_layer_name']!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(k for k in d if k not in names and k not in KNOWN_EXTRA_KEYS)
        if unknown:
            warnings.warn(f"config fields not used by OpenELM, ignored: {', '.join(unknown)}", stacklevel=2)
        kwargs = {k: v for k, v in d.items() if k in names and k not in ("num_query_heads", "num_kv_heads")}
        if "num_transformer_layers" not in d:
            raise ValueError("missing field 'num_transformer_layers'")
        n = _whole("num_transformer_layers", d["num_transformer_layers"])
        if not 1 <= n <= MAX_LAYERS:
            raise ValueError(f"num_transformer_layers must be between 1 and {MAX_LAYERS}, got {n}")
        q_heads, kv_heads = d.get("num_query_heads"), d.get("num_kv_heads")
        if isinstance(q_heads, (list, tuple)) and isinstance(kv_heads, (list, tuple)):
            kwargs["ffn_multipliers"] = _scaled(d.get("ffn_multipliers", 4.0), n, "ffn_multipliers", True)
            return cls._make(kwargs, q_heads, kv_heads)
        return cls.from_layerwise(**kwargs)

    @classmethod
    def from_layerwise(
        cls,
        num_transformer_layers: int,
        model_dim: int,
        head_dim: int,
        num_gqa_groups: int = 1,
        qkv_multipliers: float | tuple[float, ...] = 1.0,
        ffn_multipliers: float | tuple[float, ...] = 4.0,
        **kwargs: Any,
    ) -> OpenELMConfig:
        """Derive per-layer heads and FFN widths from (alpha, beta) with Apple's rounding rules."""
        if num_gqa_groups < 1:
            raise ValueError(f"num_gqa_groups must be >= 1, got {num_gqa_groups}")
        n = num_transformer_layers
        qkv_mults = _scaled(qkv_multipliers, n, "qkv_multipliers", False)
        q_heads = [make_divisible(model_dim * m, head_dim * num_gqa_groups) // head_dim for m in qkv_mults]
        kv_heads = [q // num_gqa_groups for q in q_heads]
        kwargs.update(
            num_transformer_layers=n,
            model_dim=model_dim,
            head_dim=head_dim,
            num_gqa_groups=num_gqa_groups,
            ffn_multipliers=_scaled(ffn_multipliers, n, "ffn_multipliers", True),
            qkv_multipliers=qkv_multipliers,
        )
        return cls._make(kwargs, q_heads, kv_heads)

    @classmethod
    def _make(cls, kwargs: dict[str, Any], q_heads: Any, kv_heads: Any) -> OpenELMConfig:
        qkv = kwargs.get("qkv_multipliers", (1.0,))
        kwargs["qkv_multipliers"] = (float(qkv),) if isinstance(qkv, Number) else tuple(float(v) for v in qkv)
        kwargs["ffn_multipliers"] = tuple(float(v) for v in kwargs["ffn_multipliers"])
        return cls(
            num_query_heads=tuple(int(h) for h in q_heads), num_kv_heads=tuple(int(h) for h in kv_heads), **kwargs
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> OpenELMConfig:
        """A released size by name: OpenELM-270M, -450M, -1_1B, -3B, each also with -Instruct."""
        base = name.removeprefix("apple/").removesuffix("-Instruct")
        if base not in PRESETS:
            raise ValueError(f"unknown OpenELM preset {name!r}; choose from {', '.join(preset_names())}")
        return cls.from_layerwise(**{**_PRESET_COMMON, **PRESETS[base], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> OpenELMConfig:
        """A few-layer config for tests that still varies heads and FFN width per layer, with GQA."""
        args = dict(
            num_transformer_layers=4,
            model_dim=64,
            head_dim=16,
            num_gqa_groups=2,
            qkv_multipliers=(0.5, 1.0),
            ffn_multipliers=(0.5, 4.0),
            ffn_dim_divisor=32,
            vocab_size=256,
        )
        return cls.from_layerwise(**{**args, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Apple's config.json fields (what HF's OpenELMConfig and `mlx_lm.load` read)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        if len(self.qkv_multipliers) == 1:  # Apple's config accepts a number or [min, max], not [x]
            d["qkv_multipliers"] = self.qkv_multipliers[0]
        return {
            "model_type": "openelm",
            "architectures": ["OpenELMForCausalLM"],
            "activation_fn_name": "swish",
            "normalization_layer_name": "rms_norm",
            **d,
        }

    @property
    def is_3b_shaped(self) -> bool:
        """True for models as wide as the 3B, whose activations overflow float16 (see FLOAT16_OVERFLOW)."""
        return self.model_dim >= 3072

    def num_parameters(self) -> int:
        """Parameter count without building the model (tied embedding counted once)."""
        D, hd = self.model_dim, self.head_dim
        total = self.vocab_size * D + D  # embedding + final norm
        if not self.share_input_output_layers:
            total += self.vocab_size * D
        for q, kv, inter in zip(self.num_query_heads, self.num_kv_heads, self.intermediate_sizes):
            total += (q + 2 * kv) * hd * D + q * hd * D  # qkv_proj, out_proj
            total += (3 if self.ffn_with_glu else 2) * inter * D  # proj_1 (+gate), proj_2
            total += 2 * D + (2 * hd if self.normalize_qk_projections else 0)
        return total


def _whole(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be a whole number, got {v!r}")
    return v


def _check_types(cfg: OpenELMConfig) -> None:
    """Every field has the type it declares: `model_dim: 192.0` or `ffn_with_glu: "false"` are refused."""
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        v, kind = getattr(cfg, f.name), str(f.type)
        if kind == "int":
            _whole(f.name, v)
        elif kind == "bool" and not isinstance(v, bool):
            raise ValueError(f"{f.name} must be true or false, got {v!r}")
        elif kind == "float" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)):
            raise ValueError(f"{f.name} must be a number, got {v!r}")
        elif kind.startswith("tuple[int"):
            for x in v:
                _whole(f.name, x)
        elif kind.startswith("tuple[float") and not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in v
        ):
            raise ValueError(f"{f.name} must be numbers, got {list(v)!r}")


def preset_names() -> list[str]:
    """All released model names, base and Instruct."""
    return [n + suffix for n in PRESETS for suffix in ("", "-Instruct")]
