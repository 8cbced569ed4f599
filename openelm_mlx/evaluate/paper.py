"""The OpenELM paper's zero-shot results (model card and paper Table 4a; lm-eval-harness with BOS added) and the
released size a model's architecture matches."""

from __future__ import annotations

from ..model.config import PRESETS, OpenELMConfig

PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande")
PAPER_RESULTS: dict[str, tuple[float, ...]] = {  # percent, in PAPER_TASKS order, then the average
    "OpenELM-270M": (26.45, 45.08, 53.98, 46.71, 69.75, 84.70, 53.91, 54.37),
    "OpenELM-450M": (27.56, 48.06, 55.78, 53.97, 72.31, 87.20, 58.01, 57.56),
    "OpenELM-1_1B": (32.34, 55.43, 63.58, 64.81, 75.57, 90.60, 61.72, 63.44),
    "OpenELM-3B": (35.58, 59.89, 67.40, 72.44, 78.24, 92.70, 65.51, 67.39),
}
INSTRUCT_AVERAGES = {"OpenELM-270M": 55.11, "OpenELM-450M": 59.95, "OpenELM-1_1B": 65.50, "OpenELM-3B": 69.15}
_SHAPE = ("num_transformer_layers", "model_dim", "head_dim", "num_query_heads", "num_kv_heads", "intermediate_sizes")


def known_size(config: OpenELMConfig) -> str | None:
    """The released size ("OpenELM-270M", ...) whose architecture `config` has, or None."""
    for name in PRESETS:
        preset = OpenELMConfig.from_preset(name)
        if all(getattr(config, f) == getattr(preset, f) for f in _SHAPE) and config.vocab_size == preset.vocab_size:
            return name
    return None


def paper_row(config: OpenELMConfig, instruct: bool = False) -> dict[str, float] | None:
    """{task: the paper's percent, "average": ...} for a model of a released size; an Instruct model (same shapes)
    has only the paper's average."""
    size = known_size(config)
    if size is None:
        return None
    if instruct:
        return {"average": INSTRUCT_AVERAGES[size]}
    return dict(zip((*PAPER_TASKS, "average"), PAPER_RESULTS[size]))
