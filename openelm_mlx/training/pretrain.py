"""Pretraining an OpenELM from scratch with CoreNet's recipe, or continuing a converted model on raw text
(`init_from`), on one Mac or several (mx.distributed).

Also trains a SentencePiece tokenizer with OpenELM's special ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import CheckpointError, DataError, OptionError, check_range, settings_field
from ..folders.fs import check_output_file
from ..generation.tokenizer import Tokenizer
from ..model.config import OpenELMConfig
from ..model.decoder import Model
from ..model.loss import lm_loss
from .data import TokenData, data_files, read_documents, tokenize_to_file
from .loop import enable_grad_checkpoint, micro_batches, prepare_run_folder, run_training
from .memory import check_memory, plan_memory
from .settings import RunSettings
from .trainable import ModelWeights
from .tune import make_trainer

MIN_VOCAB = 260  # 256 byte pieces, unk, BOS, EOS and at least one merge
DEFAULT_SEQ_LEN = 512
log = logging.getLogger("openelm_mlx")


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


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(RunSettings):
    """Settings of a pretraining run (CoreNet's recipe, sized down by the caller); checked when built.

    Each field with help is also a `pretrain` CLI option, with this default. `tokenizer` may be left out with
    `init_from` (the model's own is used).
    """

    data: list[str]
    tokenizer: str = ""
    init_from: str | None = None
    steps: int = settings_field(1000, "Optimizer steps.", ("--iters",))
    batch_size: int = settings_field(8, "Sequences per micro-batch per process.")
    seq_len: int | None = settings_field(
        None, f"Tokens per sequence (default {DEFAULT_SEQ_LEN}, or the model's max_context_length if shorter)."
    )
    lr: float = settings_field(5.3e-3, "Peak learning rate (CoreNet 270M: 5.3e-3; lower it to continue a model).")
    warmup: int = settings_field(100, "Linear warmup steps from 1e-6.")
    weight_decay: float = settings_field(0.1, "Decoupled weight decay (not on norms).")
    z_loss: float = settings_field(1e-4, "z-loss weight on logsumexp^2.")
    save_every: int = settings_field(500, "Checkpoint every N steps (0: never).")
    val_fraction: float = settings_field(0.02, "Fraction of tokens held out (0: no held-out loss).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("seq_len", self.seq_len, 1, integer=True)
        check_range("z_loss", self.z_loss, 0, 1)
        check_range("val_fraction", self.val_fraction, 0, 0.5)
        if not self.tokenizer and not self.init_from:
            raise OptionError("tokenizer", "is needed (a SentencePiece .model; see train-tokenizer) unless --init-from")

    def seq_len_for(self, config: OpenELMConfig) -> int:
        """`seq_len`, or the default shrunk to the model's context (with a note).

        Raises:
            OptionError: a `seq_len` past the model's max_context_length.
        """
        limit = config.max_context_length
        if self.seq_len is not None:
            if self.seq_len > limit:
                raise OptionError("seq_len", f"{self.seq_len} is more than the model's max_context_length {limit}")
            return self.seq_len
        if limit < DEFAULT_SEQ_LEN:
            log.info("note: --seq-len %d (the model's max_context_length; the default is %d)", limit, DEFAULT_SEQ_LEN)
        return min(DEFAULT_SEQ_LEN, limit)


RUN_FILES = ModelWeights.run_files


def pretrain(config: OpenELMConfig | None, run: PretrainConfig, progress: bool = False) -> dict[str, float]:
    """Train `config` from scratch, or continue `run.init_from` (then `config` is None: the model's own),
    on `run.data`; the final model is saved in `run.out` (or resume a run there).

    Returns:
        Final metrics: {"step", "loss", "val_loss"}.

    Raises:
        OptionError: a config together with init_from, a tokenizer whose vocabulary is not the model's, a
            quantized init_from model; see also `RunSettings`, `prepare_run_folder`.
        CheckpointError: init_from is not a model folder.
    """
    if config is not None and run.init_from:
        raise OptionError("arch", "and --init-from cannot both be given: a continued model keeps its own config")
    if config is None and not run.init_from:
        raise OptionError("arch", "is needed: give --arch (e.g. OpenELM-270M), --arch-config FILE or --init-from MODEL")
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    out = Path(run.out)
    base = _init_config(run.init_from) if run.init_from else None
    config = base if base is not None else config
    seq_len = run.seq_len_for(config)
    tokenizer = _load_tokenizer(config, run)
    weights = ModelWeights(config.num_transformer_layers)
    ckpt = (
        prepare_run_folder(
            out,
            RUN_FILES,
            resume=run.resume,
            overwrite=run.overwrite,
            option="out",
            used_marks=("config.json",),
            inputs=[*run.data, *([run.init_from] if run.init_from else [])],
            writes=weights.writes(out, tokenizer.model_file),
        )
        if rank == 0
        else None
    )
    data = _prepare_data(run, tokenizer, seq_len, out, rank, world, group)
    model = _init_model(config, run)
    if run.grad_checkpoint:
        enable_grad_checkpoint(model)
    log.info(check_memory(_plan(model, run, seq_len), run.force, lora_hint=False))
    trainer = make_trainer(
        run,
        model,
        run.steps,
        group if world > 1 else None,
        weights.weights_file,
        loss_fn=lambda m, x, y: lm_loss(m, x, y, z_loss=run.z_loss),
        eval_loss_fn=lm_loss,
    )
    record = weights.record(model)
    metrics = run_training(
        trainer,
        micro_batches(lambda i: data.batch(i, run.seed, run.batch_size, seq_len, rank, world), run.grad_accum),
        run.steps,
        out,
        ckpt,
        resume=run.resume,
        val_batches=data.val_batches(run.batch_size, seq_len) if run.val_fraction > 0 else [],
        eval_every=run.val_every,
        save_every=run.save_every,
        keep_checkpoints=run.keep_checkpoints,
        state={"seed": run.seed, **record},
        check_state=partial(weights.check_resume, record),
        progress=progress,
    )
    if rank == 0:
        weights.save(
            model,
            out,
            tokenizer,
            record,
            {"train_config.json": json.dumps(asdict(replace(run, seq_len=seq_len)), indent=2)},
        )
    return metrics


def _plan(model: Model, run: PretrainConfig, seq_len: int) -> Any:
    return plan_memory(
        model,
        batch_size=run.batch_size,
        seq_len=seq_len,
        optimizer=run.optimizer,
        dtype=run.dtype,
        grad_accum=run.grad_accum,
        grad_checkpoint=run.grad_checkpoint,
    )


def _init_config(path: str) -> OpenELMConfig:
    """The config of the model to continue, read before its weights; a quantized one is refused."""
    from .finetune import read_base

    config = read_base(path)
    if config is None:
        raise CheckpointError(f"{path}: not a model folder (no config.json): --init-from takes a converted model")
    return config


def _init_model(config: OpenELMConfig, run: PretrainConfig) -> Model:
    """CoreNet's initialisation, or the weights of `run.init_from` in float32 (the master weights)."""
    if not run.init_from:
        model = Model(config)
        init_weights(model, run.seed)
        return model
    from ..folders.io import load_model

    return load_model(run.init_from, dtype="float32")


def _load_tokenizer(config: OpenELMConfig, run: PretrainConfig) -> Tokenizer:
    """The run's tokenizer (the model's own with init_from, unless given), once it is known to fit the model:
    no more pieces than embedding rows, and exactly as many when continuing a model."""
    if run.init_from and not run.tokenizer:
        from ..generation.tokenizer import find_tokenizer

        tokenizer = find_tokenizer(Path(run.init_from), None, None, name=run.init_from)
    else:
        tokenizer = Tokenizer(run.tokenizer)
    where = run.tokenizer or tokenizer.model_file
    if tokenizer.vocab_size > config.vocab_size or (run.init_from and tokenizer.vocab_size != config.vocab_size):
        raise OptionError(
            "tokenizer",
            f"{where} has {tokenizer.vocab_size} pieces but the model's vocab_size is {config.vocab_size}"
            + (": a continued model needs its own vocabulary" if run.init_from else ""),
        )
    return tokenizer


def _prepare_data(
    run: PretrainConfig, tokenizer: Tokenizer, seq_len: int, out: Path, rank: int, world: int, group: Any
) -> TokenData:
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
    return TokenData.open(path, run.val_fraction, seq_len)
