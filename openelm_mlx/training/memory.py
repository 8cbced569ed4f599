"""A training run's memory plan, made before any step: weights, gradients, optimizer state and activations at
the chosen batch and length (with and without activation checkpointing), against the machine's memory.

A plan that cannot fit is refused with the cheapest change that would fit. The estimates are checked against
the measured peak by benchmarks/finetune_memory.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import OptionError

GB = 1e9
FLOAT32 = 4


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each part of a training step's peak (`total`), and the inputs that decide them."""

    weights: int  # every parameter as held (float32 master weights; a quantized base as quantized)
    compute_copy: int  # the trainable weights cast to the compute dtype (bfloat16 runs)
    gradients: int  # float32 gradients of the trainable weights (twice with gradient accumulation)
    optimizer: int  # optimizer state
    activations: int  # what the backward pass keeps, at the chosen batch and length
    activations_checkpointed: int  # the same with each layer recomputed in the backward pass
    grad_checkpoint: bool
    # the inputs, to say what would fit
    batch_size: int
    seq_len: int
    optimizer_name: str

    @property
    def total(self) -> int:
        acts = self.activations_checkpointed if self.grad_checkpoint else self.activations
        return self.weights + self.compute_copy + self.gradients + self.optimizer + acts

    def describe(self) -> str:
        parts = [
            f"weights {self.weights / GB:.2f}",
            f"gradients {self.gradients / GB:.2f}",
            f"{self.optimizer_name} state {self.optimizer / GB:.2f}",
            f"activations {self.activations / GB:.2f} ({self.activations_checkpointed / GB:.2f} checkpointed)",
        ]
        if self.compute_copy:
            parts.insert(1, f"bfloat16 copy {self.compute_copy / GB:.2f}")
        return f"{self.total / GB:.2f} GB ({', '.join(parts)} GB)"


def optimizer_state_bytes(name: str, params: dict[str, mx.array]) -> int:
    """Float32 state of `name` over `params`: AdamW two moments, SGD one momentum, Adafactor a row and a
    column per matrix (one per vector)."""
    total = 0
    for p in params.values():
        if name == "adamw":
            total += 2 * p.size
        elif name == "sgd":
            total += p.size
        elif p.ndim >= 2:  # adafactor
            total += p.size // p.shape[-1] + p.size // p.shape[-2]
        else:
            total += p.size
    return total * FLOAT32


def activation_bytes(config: Any, batch_size: int, seq_len: int, dtype_bytes: int, checkpointed: bool) -> int:
    """What the backward pass holds of a forward over (batch_size, seq_len) tokens.

    Per layer and token: the norms' inputs and outputs, the qkv projection, normalised and rotated queries
    and keys, the attention output, the FFN's two projections and gate, the residuals; per head, the
    attention scores and probabilities (float32). The float32 logits, their log-softmax and gradient come on
    top. With checkpointing only each layer's input stays, and one layer's activations at a time.
    """
    tokens = batch_size * seq_len
    layers = []
    for i in range(config.num_transformer_layers):
        d, hd = config.model_dim, config.head_dim
        q, kv = config.num_query_heads[i] * hd, config.num_kv_heads[i] * hd
        inner = config.intermediate_sizes[i]
        per_token = (8 * d + 3 * q + 3 * kv + 6 * inner) * dtype_bytes
        scores = 2 * config.num_query_heads[i] * seq_len * FLOAT32
        layers.append(tokens * (per_token + scores))
    logits = tokens * config.vocab_size * (dtype_bytes + 3 * FLOAT32)
    if checkpointed:
        inputs = tokens * config.model_dim * dtype_bytes * config.num_transformer_layers
        return inputs + max(layers) + logits
    return sum(layers) + logits


def plan_memory(
    model: nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    optimizer: str = "adamw",
    dtype: str = "float32",
    grad_accum: int = 1,
    grad_checkpoint: bool = False,
) -> MemoryPlan:
    """The plan of training `model`'s trainable parameters (as chosen already) at this batch and length."""
    trainable = dict(tree_flatten(model.trainable_parameters()))
    n_trainable = sum(p.size for p in trainable.values())
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    dtype_bytes = 2 if dtype == "bfloat16" else FLOAT32
    config = model.config
    return MemoryPlan(
        weights=weights,
        compute_copy=n_trainable * 2 if dtype == "bfloat16" else 0,
        gradients=n_trainable * FLOAT32 * (2 if grad_accum > 1 else 1),
        optimizer=optimizer_state_bytes(optimizer, trainable),
        activations=activation_bytes(config, batch_size, seq_len, dtype_bytes, False),
        activations_checkpointed=activation_bytes(config, batch_size, seq_len, dtype_bytes, True),
        grad_checkpoint=grad_checkpoint,
        batch_size=batch_size,
        seq_len=seq_len,
        optimizer_name=optimizer,
    )


def machine_memory() -> int:
    """Bytes the process can use: Metal's recommended working set on a Mac, else the physical memory."""
    try:
        info = mx.device_info()
    except (AttributeError, RuntimeError):
        info = {}
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _largest_batch(plan: MemoryPlan, limit: int) -> int:
    """The largest batch (at most the plan's) whose checkpointed run fits `limit` (0: none)."""
    fixed = replace(plan, grad_checkpoint=True)
    per_example = fixed.activations_checkpointed / max(plan.batch_size, 1)
    room = limit - (fixed.total - fixed.activations_checkpointed)
    return min(plan.batch_size, int(room // per_example)) if room > 0 and per_example > 0 else 0


def cheapest_fix(plan: MemoryPlan, limit: int, lora_hint: bool = True) -> str:
    """The first change that brings `plan` under `limit`: checkpointing, then a smaller batch (the same
    global batch through accumulation), then Adafactor's factored state, then adapters (lora)."""
    if not plan.grad_checkpoint and replace(plan, grad_checkpoint=True).total <= limit:
        return "add --grad-checkpoint"
    options = "--grad-checkpoint"
    for optimizer in dict.fromkeys([plan.optimizer_name, "adafactor"]):
        if optimizer != plan.optimizer_name:
            scale = plan.optimizer / max(optimizer_state_bytes(plan.optimizer_name, {"w": mx.zeros((1024, 1024))}), 1)
            plan = replace(plan, optimizer=int(scale * optimizer_state_bytes(optimizer, {"w": mx.zeros((1024, 1024))})))
            plan = replace(plan, optimizer_name=optimizer)
            options = f"--optimizer {optimizer} {options}"
        batch = _largest_batch(plan, limit)
        if batch >= 1:
            if batch == plan.batch_size:
                return f"use {options}"
            accum = -(-plan.batch_size // batch)
            return f"use {options} --batch-size {batch} --grad-accum {accum} (about the same global batch)"
    if lora_hint:
        return "train adapters with `openelm-mlx lora` (QLoRA on a quantized model for the least memory)"
    return "use a smaller model or a machine with more memory"


def check_memory(plan: MemoryPlan, force: bool = False, limit: int | None = None, lora_hint: bool = True) -> str:
    """A one-line summary of `plan` against the machine; refused when it cannot fit, unless `force`.

    Raises:
        OptionError: the plan is over the machine's memory, with the cheapest change that would fit.
    """
    limit = machine_memory() if limit is None else limit
    line = f"memory plan: {plan.describe()} of {limit / GB:.1f} GB"
    if plan.total > limit and not force:
        raise OptionError(
            "force",
            f"the run needs about {plan.total / GB:.1f} GB, more than this machine's {limit / GB:.1f} GB "
            f"({plan.describe()}): {cheapest_fix(plan, limit, lora_hint)}; or --force to try anyway",
        )
    return line
