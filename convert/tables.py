"""One name table per checkpoint format, and pure functions mapping state dicts through them.

Templates use `{}` for the layer index. Keys outside a table raise, naming the key.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import TypeVar

from openelm_mlx.errors import CheckpointError

T = TypeVar("T")

_LAYER_PARAMS = (
    "attn.qkv_proj.weight",
    "attn.q_norm.weight",
    "attn.k_norm.weight",
    "attn.out_proj.weight",
    "ffn.proj_1.weight",
    "ffn.proj_2.weight",
    "attn_norm.weight",
    "ffn_norm.weight",
)

# Hugging Face (apple/OpenELM-*) key -> MLX key. Our module names equal HF's, so this is the identity.
HF_TABLE: dict[str, str | None] = {
    "transformer.token_embeddings.weight": "transformer.token_embeddings.weight",
    **{f"transformer.layers.{{}}.{p}": f"transformer.layers.{{}}.{p}" for p in _LAYER_PARAMS},
    "transformer.norm.weight": "transformer.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "transformer.classifier.weight": None,  # unused copy in Apple's untied checkpoints
}

# CoreNet (`corenet-train` checkpoint_*.pt) key -> MLX key: no `transformer.` prefix, `classifier` head.
CORENET_TABLE: dict[str, str | None] = {
    "token_embeddings.weight": "transformer.token_embeddings.weight",
    **{f"layers.{{}}.{p}": f"transformer.layers.{{}}.{p}" for p in _LAYER_PARAMS},
    "norm.weight": "transformer.norm.weight",
    "classifier.weight": "lm_head.weight",
}

TABLES = {"huggingface": HF_TABLE, "corenet": CORENET_TABLE}


@functools.lru_cache(maxsize=8)
def _compiled(items: tuple[tuple[str, str | None], ...]) -> list[tuple[re.Pattern[str], str | None]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in items]


def map_name(name: str, table: Mapping[str, str | None]) -> str | None:
    """The target name of `name` (None: deliberately dropped).

    Raises:
        KeyError: `name` is not in the table.
    """
    for pattern, dst in _compiled(tuple(table.items())):
        match = pattern.match(name)
        if match:
            return None if dst is None else dst.replace("{}", match.group(1)) if match.groups() else dst
    raise KeyError(name)


def map_state_dict(state: Mapping[str, T], table: Mapping[str, str | None], source: str = "checkpoint") -> dict[str, T]:
    """Rename every key through `table` (templates match any layer index), dropping those it maps to None.

    Raises:
        CheckpointError: naming `source` and the first key the table does not know, or two keys
            that map to the same name.
    """
    out: dict[str, T] = {}
    for name, value in state.items():
        try:
            target = map_name(name, table)
        except KeyError:
            raise CheckpointError(f"{source}: unknown tensor {name!r} for this checkpoint format") from None
        if target is not None:
            if target in out:
                raise CheckpointError(f"{source}: two tensors map to {target!r}")
            out[target] = value
    return out


def invert(table: Mapping[str, str | None]) -> dict[str, str]:
    """The reverse table (MLX name template -> source name template), for export.

    Raises:
        ValueError: two source names map to the same target (the table would not be invertible).
    """
    inverse: dict[str, str] = {}
    for src, dst in table.items():
        if dst is not None:
            if dst in inverse:
                raise ValueError(f"{dst!r} has two sources in the table: {inverse[dst]!r} and {src!r}")
            inverse[dst] = src
    return inverse


def detect_format(names: list[str]) -> str:
    """'huggingface' when keys carry the `transformer.` prefix, else 'corenet'."""
    return "huggingface" if any(n.startswith("transformer.") for n in names) else "corenet"
