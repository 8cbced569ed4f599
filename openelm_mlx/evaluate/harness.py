"""lm-evaluation-harness (0.4.x) support: the `openelm-mlx` LM adapter on our scorer and generation, task
resolution (names, `paper`, local YAML files), one-line errors for missing or unreachable task data.

lm-eval 0.4.x finds models only in its own table or among modules already imported (no plugin entry points:
EleutherAI/lm-evaluation-harness#1457, #3282). Importing this module registers `openelm-mlx`; so does a task YAML
given to `lm_eval --tasks FILE.yaml` that names `!function openelm_mlx.evaluate.harness.process_docs` (lm-eval
imports it while reading the file, before it builds the model), and `python -m openelm_mlx.evaluate` is lm-eval's own
command line with the model registered.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..errors import DataError, HubError, OptionError, check_range
from ..generation.generate import generate
from ..generation.settings import GenerationConfig
from .paper import PAPER_TASKS
from .scoring import encode_pair, loglikelihood, loglikelihood_rolling

MODEL_NAME = "openelm-mlx"
REQUIRED_FIELDS = ("task", "dataset_path", "doc_to_text", "doc_to_target")
MAX_GEN_TOKS = 256  # lm-eval's default for generate_until tasks that name none

log = logging.getLogger(__name__)


def process_docs(dataset: Any) -> Any:
    """The identity: a local task YAML names it (`process_docs: !function openelm_mlx.evaluate.harness.process_docs`)
    so that the plain `lm_eval` command imports this module, and with it the `openelm-mlx` model."""
    return dataset


@register_model(MODEL_NAME)
class OpenELMLM(LM):
    """lm-eval's `LM` over an OpenELM model: `--model openelm-mlx --model_args model=PATH[,tokenizer=T,adapter_path=A]`.

    Args:
        model: a loaded `Model`, or a folder / Hub repo id to load (default: the bundled demo).
        tokenizer: our `Tokenizer` with a loaded model, else a tokenizer path/repo (as `--tokenizer`).
        adapter_path: LoRA/DoRA adapters to apply to a loaded-by-path model.
        batch_size: continuation rows per forward pass (lm-eval passes its `--batch_size`).
        max_length: the window (default: the model's `max_context_length`).
        device, max_batch_size: lm-eval passes its own (`--device` defaults to cuda:0); MLX picks its device.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        adapter_path: str | None = None,
        batch_size: int | str | None = 16,
        max_length: int | str | None = None,
        device: str | None = None,
        max_batch_size: int | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(model, (str, Path)) or model is None:
            model, tokenizer = load_model(model, tokenizer, adapter_path)
        elif tokenizer is None or adapter_path is not None:
            raise OptionError("tokenizer", "a loaded model needs its loaded tokenizer (and adapters applied already)")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = _whole_number("batch_size", 16 if batch_size in (None, "auto") else batch_size)
        self.max_length = _whole_number("max_length", max_length or model.config.max_context_length)
        self.progress = progress

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, context, continuation) for context, continuation in _args(requests)]
        scores = loglikelihood(self.model, pairs, self.batch_size, self.progress and not disable_tqdm, self.max_length)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        documents = [self.tokenizer.encode(text, add_bos=False) for (text,) in _args(requests)]
        return loglikelihood_rolling(
            self.model,
            documents,
            self.tokenizer.bos_id,
            self.batch_size,
            self.progress and not disable_tqdm,
            self.max_length,
        )

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Generation through `generate(model, tokenizer, [prompts...], config=...)`, one call per batch of requests
        that share their settings; prompts are BOS + the context's last tokens that leave room for the answer."""
        args = _args(requests)
        answers: list[str | None] = [None] * len(args)
        by_settings: dict[GenerationConfig, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            by_settings.setdefault(generation_config(gen_kwargs), []).append(i)
        for config, rows in by_settings.items():
            room = max(1, self.max_length - config.max_tokens)
            for s in range(0, len(rows), self.batch_size):
                chunk = rows[s : s + self.batch_size]
                prompts = [self._prompt_ids(args[i][0], room) for i in chunk]
                for i, text in zip(chunk, generate(self.model, self.tokenizer, prompts, config=config)):
                    answers[i] = text
        return answers  # type: ignore[return-value]

    def _prompt_ids(self, context: str, room: int) -> list[int]:
        ids = self.tokenizer.encode(context)  # BOS + context
        return ids if len(ids) <= room else [ids[0], *ids[len(ids) - room + 1 :]]

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": self.model.config.num_parameters(), "max_length": self.max_length}


def _args(requests: Sequence[Any]) -> list[tuple]:
    return [r.args if hasattr(r, "args") else tuple(r) for r in requests]


def _whole_number(option: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise OptionError(option, f"must be a whole number, got {value!r}") from None
    check_range(option, number, 1, integer=True)
    return number


def generation_config(gen_kwargs: dict[str, Any]) -> GenerationConfig:
    """Our settings from lm-eval's `gen_kwargs` (`until`, `max_gen_toks`, `temperature`, `do_sample`, `top_p`,
    `top_k`); any other key is refused rather than ignored."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", ())
    stop = (until,) if isinstance(until, str) else tuple(until)
    sample = bool(kwargs.pop("do_sample", False))
    temp = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
    settings: dict[str, Any] = dict(  # greedy unless do_sample, whatever the temperature (as lm-eval's hf model)
        max_tokens=int(kwargs.pop("max_gen_toks", MAX_GEN_TOKS)), temp=temp if sample else 0.0, stop=stop
    )
    for ours, theirs in (("top_p", "top_p"), ("top_k", "top_k")):
        if theirs in kwargs:
            settings[ours] = kwargs.pop(theirs)
    if kwargs:
        raise OptionError("gen_kwargs", f"not supported: {', '.join(sorted(kwargs))}")
    return GenerationConfig(**settings)


def load_model(model: str | Path | None, tokenizer: str | None = None, adapter_path: str | None = None):
    """(model, tokenizer) from a folder or Hub id (the bundled demo for None), with adapters applied."""
    from ..demo import DEMO_DIR
    from ..folders.io import load

    m, tok = load(str(model or DEMO_DIR), tokenizer=tokenizer)
    if adapter_path:
        from ..training.lora import load_adapters

        load_adapters(m, adapter_path)
    return m, tok


def read_task_file(path: str | Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it, checked for the fields a task needs, with relative local data files made
    relative to the YAML's own folder (lm-eval would look in the current directory).

    Raises:
        DataError: naming the file and the missing fields, or why it could not be read.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: task file not found")
    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as e:  # noqa: BLE001 - yaml, include and !function errors all mean a bad task file
        raise DataError(f"{path}: not a readable task file ({type(e).__name__}: {str(e)[:150]})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: a task file is a YAML mapping")
    required = REQUIRED_FIELDS + (("doc_to_choice",) if config.get("output_type") == "multiple_choice" else ())
    missing = [f for f in required if f not in config]
    if missing:
        raise DataError(f"{path}: the task misses field(s) {', '.join(missing)}")
    return _local_data_files(config, path.parent.resolve())


def _local_data_files(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is None:
        return config

    def fix(f: Any) -> Any:
        if isinstance(f, list):
            return [fix(x) for x in f]
        if isinstance(f, str) and "://" not in f and not Path(f).is_absolute():
            found = folder / f
            if not found.exists():
                raise DataError(f"{config['task']}: data file {f} not found in {folder}")
            return str(found)
        return f

    config = copy.deepcopy(config)
    config["dataset_kwargs"]["data_files"] = (
        {k: fix(v) for k, v in files.items()} if isinstance(files, dict) else fix(files)
    )
    return config


@functools.lru_cache(maxsize=2)
def task_manager(include_defaults: bool = True) -> Any:
    """lm-eval's TaskManager, built once per process (indexing its ~15k built-in tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


def resolve_tasks(names: Sequence[str]) -> tuple[list[Any], Any]:
    """lm-eval task specs for `names` (task names, glob patterns, `paper`, or YAML files) and the TaskManager.

    Raises:
        OptionError: an unknown task name.
        DataError: a bad task file.
    """
    expanded = [t for n in names for t in (PAPER_TASKS if n == "paper" else (n,))]
    files = [n for n in expanded if n.endswith((".yaml", ".yml"))]
    manager = task_manager(include_defaults=len(files) < len(expanded))
    specs: list[Any] = []
    for name in expanded:
        if name in files:
            specs.append(read_task_file(name))
            continue
        matches = manager.match_tasks([name])
        if not matches:
            raise OptionError(
                "tasks", f"unknown task {name!r} (`lm-eval ls tasks` lists lm-eval's; or give a task .yaml file)"
            )
        specs += [m for m in matches if m not in specs]
    return specs, manager


def load_tasks(specs: Sequence[Any], manager: Any) -> list[Any]:
    """Build each task (downloading its data); a task whose data cannot be had gets one line naming it.

    Raises:
        HubError: naming the task and how to get its data offline.
    """
    loaded = []
    for spec in specs:
        name = spec["task"] if isinstance(spec, dict) else spec
        try:
            result = manager.load([spec])
        except (ConnectionError, OSError) as e:
            raise HubError(
                f"task {name}: its data could not be fetched ({str(e)[:120]}). Run once online to fill the datasets "
                "cache, then HF_DATASETS_OFFLINE=1 uses it; or copy the data and write a task YAML over the local "
                "files (dataset_path: json, dataset_kwargs.data_files; see examples/eval_task)"
            ) from None
        loaded += list(result["tasks"].values()) + list(result["groups"].values())
    return loaded


@contextlib.contextmanager
def _no_git_probe() -> Iterator[None]:
    """lm-eval records the git commit of the current folder by running `git describe`, which prints "fatal: not a
    git repository" outside one; the folder the user runs from says nothing about the model, so it is not asked."""
    from lm_eval import evaluator

    probe = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = probe


def _check_fewshot(tasks: Sequence[Any], num_fewshot: int | None) -> None:
    """Each task has the examples its few-shot prompts draw; lm-eval itself fails mid-run with "Sample larger than
    population". Its rules (0.4): a task whose config pins num_fewshot to 0 keeps 0 whatever `num_fewshot` says, and
    when the few-shot split is the evaluated one (both unset included) one more is drawn, to leave the evaluated
    example out.

    Raises:
        OptionError: `num_fewshot` is more than a task can draw. DataError: a task file's own num_fewshot is.
    """
    for task in tasks:
        sampler, config = getattr(task, "sampler", None), getattr(task, "config", None)
        if sampler is None or config is None or config.num_fewshot == 0:  # a group, no examples, or pinned to 0
            continue
        shots = num_fewshot if num_fewshot is not None else config.num_fewshot
        if not shots:
            continue
        same = getattr(getattr(task, "fewshot_cfg", None), "split", None) == config.test_split
        have = max(len(sampler.fewshot_docs()) - same, 0)  # the pool lm-eval built (made once, cached)
        if shots > have:
            what = f"task {config.task} has {have} examples to draw" + (" (the evaluated one left out)" if same else "")
            if num_fewshot is None:
                raise DataError(f"{what}, fewer than its num_fewshot of {shots}")
            raise OptionError("num_fewshot", f"{shots} is more than {what}")


def run_tasks(
    lm: OpenELMLM,
    specs: Sequence[Any],
    manager: Any,
    num_fewshot: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """lm-eval's results dict for `lm` on tasks from `resolve_tasks` (`simple_evaluate`; no global RNG is seeded:
    the few-shot sampler gets `seed`, and tasks shuffle with their own generators).

    Raises:
        OptionError: `num_fewshot` < 0, `limit` <= 0. HubError: see `load_tasks`.
    """
    import lm_eval

    check_range("num_fewshot", num_fewshot, 0, integer=True)
    check_range("limit", limit, 1, integer=True)
    tasks = load_tasks(specs, manager)
    _check_fewshot(tasks, num_fewshot)
    with _no_git_probe():
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
            fewshot_random_seed=seed,
            log_samples=False,
        )


def evaluate_tasks(lm: OpenELMLM, names: Sequence[str], **settings: Any) -> dict[str, Any]:
    """`run_tasks` on task names, `paper`, or task YAML files."""
    return run_tasks(lm, *resolve_tasks(names), **settings)
