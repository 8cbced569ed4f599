"""The bundled demo model: small, offline, the CLI's default, and as good as its recorded held-out loss."""

import json

import mlx.core as mx
import numpy as np
from typer.testing import CliRunner

from openelm_mlx import load
from openelm_mlx.cli import app
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.model.loss import lm_loss


def test_demo_is_small_and_layer_wise_scaled():
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir() if p.is_file()) <= 15 * 2**20
    model, tok = load(DEMO_DIR)
    assert len(set(model.config.num_query_heads)) > 1 and len(set(model.config.intermediate_sizes)) > 1
    assert tok.vocab_size == model.config.vocab_size == 2048


def test_generate_defaults_to_the_demo_and_says_so():
    result = CliRunner().invoke(app, ["generate", "--prompt", "ROMEO:", "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "bundled demo" in result.stderr and "--model" in result.stderr
    assert len(result.stdout.strip()) > 0


def test_recorded_held_out_loss_reproduces(shakespeare_path):
    """Recompute the held-out loss on the same windows pretraining evaluated (the corpus tail)."""
    from openelm_mlx.training.data import TokenData

    metrics = json.loads((DEMO_DIR / "metrics.json").read_text())
    model, tok = load(DEMO_DIR)
    tokens = np.array([tok.bos_id, *tok.encode(shakespeare_path.read_text(), add_bos=False), tok.eos_id])
    data = TokenData.from_tokens(tokens, metrics["val_fraction"], metrics["seq_len"])
    batches = data.val_batches(metrics["batch_size"], metrics["seq_len"])
    loss = float(np.mean([lm_loss(model, mx.array(x), mx.array(y))[0].item() for x, y in batches]))
    assert abs(loss - metrics["val_loss"]) < 1e-3
