"""Pretraining an OpenELM from scratch with CoreNet's recipe, on one Mac or several (mx.distributed).

Also trains a SentencePiece tokenizer with OpenELM's special ids.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import DataError, OptionError, check_range, settings_field
from ..evaluate.perplexity import check_context
from ..folders.fs import check_output_file
from ..folders.io import parse_dtype, save
from ..generation.tokenizer import TOKENIZER_FILE, Tokenizer
from ..model.config import OpenELMConfig
from ..model.decoder import Model
from .data import TokenData, data_files, read_documents, tokenize_to_file
from .loop import (
    CHECKPOINTS,
    OptimizerConfig,
    Trainer,
    check_schedule,
    enable_grad_checkpoint,
    lm_loss,
    make_optimizer,
    micro_batches,
    prepare_run_folder,
    run_training,
)

MIN_VOCAB = 260  # 256 byte pieces, unk, BOS, EOS and at least one merge


def init_weights(model: Model, seed: int) -> None:
    """CoreNet's initialisation: Linear ~ N(0, in^-1/2), embedding ~ N(0, D^-1/2), norms 1,
    `out_proj` and `proj_2` ~ N(0, D^-1/2 (2L)^-1/2)."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    residual_std = cfg.model_dim**-0.5 * (2 * cfg.num_transformer_layers) ** -0.5
    params = []
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            value = np.ones(p.shape)
        elif name.endswith(("out_proj.weight", "proj_2.weight")):
            value = rng.normal(0.0, residual_std, p.shape)
        elif name.endswith("token_embeddings.weight"):
            value = rng.normal(0.0, cfg.model_dim**-0.5, p.shape)
        else:
            value = rng.normal(0.0, p.shape[-1] ** -0.5, p.shape)
        params.append((name, mx.array(value.astype(np.float32))))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def train_tokenizer(
    data: Sequence[str | Path],
    vocab_size: int,
    output: str | Path,
    max_sentences: int = 2_000_000,
    force: bool = False,
) -> Path:
    """Train a SentencePiece BPE model (byte fallback; unk 0, BOS 1, EOS 2, no pad), written atomically.

    An existing `output` is replaced only with `force`, and never when it is one of the data files.
    """
    import sentencepiece as spm

    check_range("vocab_size", vocab_size, MIN_VOCAB, 1 << 20, integer=True)
    output = Path(output)
    files = data_files(data)  # listed before our temporary folder exists (it may be inside a data folder)
    check_output_file(output, force, inputs=files, inputs_are="training data files", what="tokenizer")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.tmp-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for doc in read_documents(files):
                f.writelines(line + "\n" for line in doc.splitlines() if line.strip())
        try:
            _train_sentencepiece(spm, corpus, Path(tmp) / "tok", vocab_size, max_sentences)
        except RuntimeError as e:  # SentencePiece reports a vocabulary the corpus cannot fill this way
            raise DataError(f"{', '.join(map(str, data))}: {_vocab_problem(str(e), vocab_size)}") from None
        os.replace(Path(tmp) / "tok.model", output)
    return output


def _vocab_problem(message: str, vocab_size: int) -> str:
    """SentencePiece's failure as one sentence about the vocabulary size (its own text cites its C++ source)."""
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
        return f"a vocabulary of {vocab_size} is too small: this text needs at least {m.group(2)} pieces"
    if m := re.search(r"too high \((\d+)\)\. Please set it to a value <= (\d+)", message):
        return f"a vocabulary of {vocab_size} is too large for this text: at most {m.group(2)} pieces"
    detail = re.sub(r"^.*\] ", "", message.strip().splitlines()[-1]) if message.strip() else "training failed"
    return f"cannot train {vocab_size} pieces ({detail})"


def _train_sentencepiece(spm: Any, corpus: Path, prefix: Path, vocab_size: int, max_sentences: int) -> None:
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=False,
        num_threads=1,  # deterministic: the same data gives the same tokenizer
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of a pretraining run (CoreNet's recipe, sized down by the caller); checked when built.

    Each field with help is also a `pretrain` CLI option, with this default.
    """

    data: list[str]
    tokenizer: str
    out: str
    steps: int = settings_field(1000, "Optimizer steps.")
    batch_size: int = settings_field(8, "Sequences per micro-batch per process.")
    seq_len: int = settings_field(512, "Tokens per sequence (at most the model's max_context_length).")
    grad_accum: int = settings_field(1, "Micro-batches per optimizer step.")
    lr: float = settings_field(5.3e-3, "Peak learning rate (CoreNet 270M: 5.3e-3).")
    min_lr: float | None = settings_field(None, "Final cosine learning rate (default lr/10).")
    warmup: int = settings_field(100, "Linear warmup steps from 1e-6.")
    weight_decay: float = settings_field(0.1, "AdamW weight decay (not on norms).")
    grad_clip: float = settings_field(1.0, "Gradient-norm clip (0: off).")
    z_loss: float = settings_field(1e-4, "z-loss weight on logsumexp^2.")
    dtype: str = settings_field("float32", "Compute dtype: float32 or bfloat16 (float32 master weights).")
    grad_checkpoint: bool = settings_field(False, "Recompute activations to save memory.")
    eval_every: int = settings_field(100, "Held-out loss every N steps (0: never).")
    save_every: int = settings_field(500, "Checkpoint every N steps (0: never).")
    keep_checkpoints: int = settings_field(2, "How many of the newest checkpoints to keep.")
    val_fraction: float = settings_field(0.02, "Fraction of tokens held out (0: no held-out loss).")
    seed: int = settings_field(0, "Seed for initialisation and data order.")
    resume: bool = settings_field(False, "Continue from the latest checkpoint in the out folder.")
    overwrite: bool = settings_field(
        False,
        "Start afresh in an out folder that holds an earlier run (its log and checkpoints go; the model is replaced).",
    )

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "keep_checkpoints"):
            check_range(name, getattr(self, name), 1, integer=True)
        check_schedule(self)
        for name in ("eval_every", "save_every", "seed"):
            check_range(name, getattr(self, name), 0, integer=True)
        check_range("z_loss", self.z_loss, 0, 1)
        check_range("val_fraction", self.val_fraction, 0, 0.5)
        if self.dtype not in ("float32", "bfloat16"):
            raise OptionError(
                "dtype", f"must be float32 or bfloat16 (float16 overflows in training), got {self.dtype!r}"
            )
        if self.resume and self.overwrite:
            raise OptionError("resume", "and overwrite cannot both be given")


RUN_FILES = ("log.jsonl", "train_config.json", CHECKPOINTS)


def pretrain(config: OpenELMConfig, run: PretrainConfig, progress: bool = False) -> dict[str, float]:
    """Train `config` from scratch (or resume) on `run.data`; the final model is saved in `run.out`.

    Returns:
        Final metrics: {"step", "loss", "val_loss"}.
    """
    compute_dtype = parse_dtype(run.dtype)
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    out = Path(run.out)
    tokenizer = _load_tokenizer(config, run)
    ckpt = (
        prepare_run_folder(
            out,
            RUN_FILES,
            resume=run.resume,
            overwrite=run.overwrite,
            option="out",
            used_marks=("config.json",),
            inputs=run.data,
            writes=_model_files(out, run.tokenizer),
        )
        if rank == 0
        else None
    )
    data = _prepare_data(run, tokenizer, out, rank, world, group)
    model = Model(config)
    init_weights(model, run.seed)
    if run.grad_checkpoint:
        enable_grad_checkpoint(model)
    trainer = Trainer(
        model,
        lambda m, x, y: lm_loss(m, x, y, z_loss=run.z_loss),
        make_optimizer(OptimizerConfig.from_settings(run, run.steps)),
        compute_dtype=None if compute_dtype == mx.float32 else compute_dtype,
        grad_clip=run.grad_clip,
        group=group if world > 1 else None,
        eval_loss_fn=lm_loss,
    )
    metrics = run_training(
        trainer,
        micro_batches(lambda i: data.batch(i, run.seed, run.batch_size, run.seq_len, rank, world), run.grad_accum),
        run.steps,
        out,
        ckpt,
        resume=run.resume,
        val_batches=data.val_batches(run.batch_size, run.seq_len) if run.val_fraction > 0 else [],
        eval_every=run.eval_every,
        save_every=run.save_every,
        keep_checkpoints=run.keep_checkpoints,
        state={"seed": run.seed},
        progress=progress,
    )
    if rank == 0:
        save(model, out, tokenizer=tokenizer, config_extra={"torch_dtype": "float32"}, force=True)
        (out / "train_config.json").write_text(json.dumps(asdict(run), indent=2))
    return metrics


def _load_tokenizer(config: OpenELMConfig, run: PretrainConfig) -> Tokenizer:
    """The run's tokenizer, once its vocabulary and `run.seq_len` are known to fit the model."""
    check_context(config, run.seq_len)
    tokenizer = Tokenizer(run.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise OptionError(
            "tokenizer",
            f"{run.tokenizer} has {tokenizer.vocab_size} pieces but the model's vocab_size is {config.vocab_size}",
        )
    return tokenizer


def _model_files(out: Path, tokenizer: str) -> tuple[str, ...]:
    """What the final save writes besides weights (the tokenizer may already be the run folder's own)."""
    own = (out / TOKENIZER_FILE).exists() and os.path.samefile(out / TOKENIZER_FILE, tokenizer)
    return ("config.json", "tokenizer_config.json") + (() if own else (TOKENIZER_FILE,))


def _prepare_data(run: PretrainConfig, tokenizer: Tokenizer, out: Path, rank: int, world: int, group: Any) -> TokenData:
    """Rank 0 tokenizes (once, cached); other ranks wait for it, then all map the same file."""
    args = (
        run.data,
        lambda t: tokenizer.encode(t, add_bos=False),
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.vocab_size,
        tokenizer.model_file,
        out / "data",
    )
    if rank == 0:
        path = tokenize_to_file(*args)
    if world > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1), group=group))  # barrier: rank 0 has written the file
    if rank != 0:
        path = tokenize_to_file(*args)  # finds the cached file
    return TokenData.open(path, run.val_fraction, run.seq_len)
