"""`evaluate`: the log-likelihood scorer, the cloze check, the lm-eval adapter and the command."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_model
from typer.testing import CliRunner

from openelm_mlx.cli import app
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.errors import DataError, OptionError
from openelm_mlx.evaluate import scoring
from openelm_mlx.evaluate.cloze import make_cloze_items, score_cloze
from openelm_mlx.evaluate.paper import known_size, paper_row
from openelm_mlx.evaluate.report import format_table
from openelm_mlx.evaluate.scoring import encode_pair, loglikelihood, loglikelihood_rolling, rolling_windows
from openelm_mlx.folders.io import load
from openelm_mlx.model.config import OpenELMConfig

TASK_YAML = Path(__file__).resolve().parents[1] / "examples" / "eval_task" / "next_line.yaml"
BOS = 1


def _has_lm_eval() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


needs_lm_eval = pytest.mark.skipif(not _has_lm_eval(), reason="lm-eval is not installed (the eval extra)")


@pytest.fixture(scope="module")
def model():
    return random_model(OpenELMConfig.tiny(max_context_length=16))


@pytest.fixture(scope="module")
def demo():
    return load(DEMO_DIR)


def _reference(model, context, continuation) -> float:
    """The continuation's summed log-probability from one full forward, log-softmax in float64 numpy."""
    ids = list(context) + list(continuation)
    logits = np.array(model(mx.array([ids[:-1]])).astype(mx.float32), dtype=np.float64)[0]
    logp = (
        logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1)[:, None]
    )
    return float(sum(logp[len(context) - 1 + j, t] for j, t in enumerate(continuation)))


def _requests(seed=0, groups=7, vocab=256):
    """Groups of requests sharing a context (BOS first), with continuations of 1-5 tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(groups):
        ctx = [BOS] + [rng.randrange(3, vocab) for _ in range(rng.randrange(0, 9))]
        out += [
            (ctx, [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 6))]) for _ in range(rng.randrange(1, 5))
        ]
    return out


def test_continuation_equals_sum_of_token_logprobs_of_one_forward(model):
    requests = _requests()
    got = [s.logprob for s in loglikelihood(model, requests, batch_size=16)]
    want = [_reference(model, c, t) for c, t in requests]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert [s.tokens for s in loglikelihood(model, requests)] == [len(t) for _, t in requests]


def test_batched_equals_unbatched_and_grouped_equals_ungrouped(model, monkeypatch):
    requests = _requests(seed=1)
    alone = [loglikelihood(model, [r], batch_size=1)[0] for r in requests]  # each in its own pass, no cache
    packs = []
    real = scoring._pack
    monkeypatch.setattr(scoring, "_pack", lambda ctx, conts: packs.append((tuple(ctx), len(conts))) or real(ctx, conts))
    for batch_size in (1, 3, 16):
        packs.clear()  # (the last batch size's packs are kept for the check below)
        batched = loglikelihood(model, requests, batch_size=batch_size)
        np.testing.assert_allclose([s.logprob for s in batched], [s.logprob for s in alone], rtol=1e-5, atol=1e-5)
        assert [s.is_greedy for s in batched] == [s.is_greedy for s in alone]
    # at batch 16 each context went through the model once, packed with all of its continuations
    contexts = [tuple(c) for c, _ in requests]
    assert sorted(packs) == sorted((c, contexts.count(c)) for c in set(contexts))
    flat = loglikelihood(model, requests, batch_size=16, share_contexts=False)
    np.testing.assert_allclose([s.logprob for s in flat], [s.logprob for s in alone], rtol=1e-5, atol=1e-5)


def test_is_greedy_matches_argmax(model):
    ctx = [BOS, 5, 9, 11]
    greedy = []
    for _ in range(3):  # the model's own greedy continuation
        ids = ctx + greedy
        greedy.append(int(model(mx.array([ids]))[0, -1].argmax().item()))
    other = [(greedy[0] + 1) % 256, *greedy[1:]]
    ours, theirs = loglikelihood(model, [(ctx, greedy), (ctx, other)])
    assert ours.is_greedy and not theirs.is_greedy and ours.logprob > theirs.logprob


def test_bos_exactly_once(demo):
    _, tok = demo
    for context, continuation in [("ROMEO:\n", "Good morrow"), ("", "Good morrow"), ("a", "b c")]:
        ctx, cont = encode_pair(tok, context, continuation)
        assert ctx[0] == tok.bos_id and (ctx + cont).count(tok.bos_id) == 1
        assert ctx + cont == tok.encode(context + continuation)  # the text's own tokenization


def test_boundary_merge_is_split_on_token_ids(demo):
    model, tok = demo
    context, continuation = "ROMEO: Go", "od morrow"  # "Go" + "od" is one token, "▁Good", in the whole text
    alone = tok.encode(context, add_bos=False)
    whole = tok.encode(context + continuation)
    assert whole[: len(alone) + 1] != [tok.bos_id, *alone]  # the merge is real
    ctx, cont = encode_pair(tok, context, continuation)
    assert ctx + cont == whole and tok.decode(cont) == "Good morrow"  # the merged token is scored, not dropped
    assert whole[len(alone) + 1 :] != cont  # what a split by length (lm-eval's hf model) would score
    score = loglikelihood(model, [(ctx, cont)])[0]
    assert score.logprob == pytest.approx(_reference(model, ctx, cont), rel=1e-5, abs=1e-5)


def test_truncation_keeps_the_continuation_and_scores_it_as_the_cut_context(model):
    long_ctx = [BOS] + list(range(3, 30))  # 28 tokens > the window of 16
    cont = [40, 41, 42]
    with pytest.warns(UserWarning, match="cut from the left"):
        got = loglikelihood(model, [(long_ctx, cont)])[0].logprob
    kept = long_ctx[-(16 - len(cont) + 1) :]
    assert len(kept) + len(cont) - 1 == 16
    assert got == pytest.approx(_reference(model, kept, cont), rel=1e-5, abs=1e-5)
    with pytest.raises(DataError, match="request 1: its continuation has 17 tokens"):
        loglikelihood(model, [(long_ctx, cont), ([BOS], list(range(3, 20)))])


def test_rolling_windows_cover_each_token_once_and_equal_direct_sums(model):
    L = model.config.max_context_length
    doc = [random.Random(2).randrange(3, 256) for _ in range(3 * L + 5)]
    windows = rolling_windows(doc, BOS, L)
    assert [t for _, cont in windows for t in cont] == doc
    assert all(len(c) + len(t) - 1 <= L for c, t in windows)
    # by hand: the first window starts at BOS; each later one predicts the next tokens after the L inputs ending
    # just before its last token, so the last (5 tokens) overlaps the one before by design
    direct = _reference(model, [BOS], doc[:L])
    direct += _reference(model, doc[L - 1 : L], doc[L : 2 * L])
    direct += _reference(model, doc[2 * L - 1 : 2 * L], doc[2 * L : 3 * L])
    direct += _reference(model, doc[3 * L + 5 - L - 1 : 3 * L], doc[3 * L :])
    got = loglikelihood_rolling(model, [doc, doc[:5]], BOS, batch_size=4)
    assert got[0] == pytest.approx(direct, rel=1e-5)
    assert got[1] == pytest.approx(_reference(model, [BOS], doc[:5]), rel=1e-5)


@needs_lm_eval
def test_rolling_windows_are_lm_evals():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in (1, 7, 16, 17, 40, 53):
        doc = list(range(100, 100 + n))
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(doc, BOS, 16, 1)]
        assert [(list(c), list(t)) for c, t in rolling_windows(doc, BOS, 16)] == theirs


def test_bad_requests_are_named(model):
    with pytest.raises(DataError, match="request 0: the continuation is empty"):
        loglikelihood(model, [([BOS], [])])
    with pytest.raises(DataError, match=r"request 1: the context: token ids must be whole numbers in \[0, 256\)"):
        loglikelihood(model, [([BOS], [5]), ([BOS, 999], [5])])
    with pytest.raises(OptionError, match="batch_size"):
        loglikelihood(model, [([BOS], [5])], batch_size=0)


def _held_out(shakespeare_path) -> str:
    """The end of tiny Shakespeare, which the demo never trained on (its last 5% of tokens were held out)."""
    text = shakespeare_path.read_text()
    return text[int(len(text) * 0.96) :]


def test_demo_beats_chance_on_held_out_cloze_and_random_model_does_not(demo, shakespeare_path):
    model, tok = demo
    items = make_cloze_items(_held_out(shakespeare_path), limit=120, seed=0)
    assert len(items) == 120 and all(len(set(i.choices)) == 4 for i in items)
    ours = score_cloze(model, tok, items, batch_size=16)
    chance = score_cloze(random_model(model.config, seed=0), tok, items, batch_size=16)
    # chance is 0.25, the standard error ~0.04 at 120 items; the demo measured 0.475, its random twin 0.30
    assert ours.acc_mi > 0.38 and ours.acc_mi - chance.acc_mi > 0.1
    assert 0.15 < chance.acc_mi < 0.37 and 0.12 < chance.acc < 0.4 and 0.12 < chance.acc_norm < 0.4


def test_cloze_items_are_seeded_and_fair():
    text = "\n".join(f"line number {i} of the play" for i in range(200))
    a, b = make_cloze_items(text, seed=3, limit=50), make_cloze_items(text, seed=3, limit=50)
    assert a == b and a != make_cloze_items(text, seed=4, limit=50)
    golds = [i.gold for i in make_cloze_items(text, seed=0)]
    assert set(golds) == {0, 1, 2, 3}
    for item in a:  # the true line is the one after the context
        n = int(item.context.splitlines()[-1].split()[2])
        assert item.choices[item.gold] == f"line number {n + 1} of the play"
    with pytest.raises(DataError, match="too few distinct"):
        make_cloze_items("a\nb\na\nb\n", "f.txt")
    with pytest.raises(OptionError, match="limit"):
        make_cloze_items(text, limit=0)


def test_paper_row_for_released_sizes_only():
    assert known_size(OpenELMConfig.from_preset("OpenELM-270M")) == "OpenELM-270M"
    assert known_size(OpenELMConfig.from_preset("OpenELM-3B-Instruct")) == "OpenELM-3B"
    assert known_size(OpenELMConfig.tiny()) is None
    row = paper_row(OpenELMConfig.from_preset("OpenELM-1_1B"))
    results = {"results": {"arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.55}}}
    table = format_table(results, row, "OpenELM-1_1B")
    assert "| arc_easy | acc_norm | 55.00 |  | 55.43 |" in table and "paper OpenELM-1_1B" in table
    assert paper_row(OpenELMConfig.from_preset("OpenELM-1_1B"), instruct=True) == {"average": 65.50}


def _cli(*args):
    return CliRunner().invoke(app, ["evaluate", *args])


def test_cli_cloze_table_and_output_rules(tmp_path, shakespeare_path):
    data = tmp_path / "held.txt"
    data.write_text(_held_out(shakespeare_path)[:6000])
    out = tmp_path / "results.json"
    result = _cli("--tasks", "cloze", "--data", str(data), "--limit", "20", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "| cloze | acc_mi |" in result.output
    saved = json.loads(out.read_text())
    assert saved["results"]["cloze"]["samples"] == 20 and saved["openelm_mlx"]["command"] == "evaluate"
    again = _cli("--tasks", "cloze", "--data", str(data), "--limit", "20", "--seed", "1", "-o", str(out))
    assert again.exit_code == 0, again.output  # an earlier results file of ours is replaced
    foreign = tmp_path / "notes.json"
    foreign.write_text("my notes")
    refused = _cli("--tasks", "cloze", "--data", str(data), "--limit", "5", "-o", str(foreign))
    assert refused.exit_code == 1 and "--force: is needed to replace" in refused.output
    assert foreign.read_text() == "my notes"
    own_input = _cli("--tasks", "cloze", "--data", str(data), "--limit", "5", "-o", str(data), "--force")
    assert own_input.exit_code == 1 and "is one of the inputs" in own_input.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "cloze", "--data", "X", "--limit", "0"], "--limit: must be >= 1, got 0"),
        (["--tasks", "cloze", "--data", "X", "--num-fewshot", "-1"], "--num-fewshot: must be >= 0, got -1"),
        (["--tasks", "cloze"], "--data: is needed by the cloze task"),
        (["--tasks", " , "], "--tasks: names no task"),
        (["--tasks", "cloze", "--data", "MISSING"], "missing.txt: no such file"),
        (["--tasks", "cloze", "--data", "X", "--batch-size", "1025"], "--batch-size: must be <= 1024, got 1025"),
        (["--tasks", "cloze", "--data", "X", "-o", "X/out.json"], "next_line.yaml is not a folder"),
    ],
)
def test_cli_bad_options_are_one_line(args, message, tmp_path):
    args = [a.replace("X", str(TASK_YAML)).replace("MISSING", str(tmp_path / "missing.txt")) for a in args]
    result = _cli(*args)
    assert result.exit_code == 1 and message in result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output


def test_cloze_needs_no_lm_eval(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("\n".join(f"a line of text number {i}" for i in range(40)))
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"  # any import of lm_eval fails
        "from openelm_mlx.cli import main; sys.argv = ['openelm-mlx', *sys.argv[1:]]; main()"
    )
    cmd = [sys.executable, "-c", code, "evaluate", "--tasks", "cloze", "--data", str(data), "--limit", "8"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| cloze | acc |" in result.stdout


@needs_lm_eval
def test_more_shots_than_a_task_has_examples_is_one_line():
    result = _cli("--tasks", str(TASK_YAML), "--num-fewshot", "41", "--limit", "2")
    assert result.exit_code == 1, result.output
    assert "--num-fewshot: 41 is more than task shakespeare_next_line has 40 examples to draw" in result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output


@needs_lm_eval
def test_shots_drawn_from_the_evaluated_split_leave_the_evaluated_example_out(tmp_path):
    import shutil

    shutil.copy(TASK_YAML.with_suffix(".jsonl"), tmp_path)
    task = tmp_path / "same_split.yaml"
    task.write_text(TASK_YAML.read_text().replace("test_split: test", "test_split: test\nfewshot_split: test"))
    result = _cli("--tasks", str(task), "--num-fewshot", "40", "--limit", "2")
    assert result.exit_code == 1, result.output
    assert "40 is more than task shakespeare_next_line has 39 examples to draw (the evaluated one left out)" in (
        result.output
    )


def test_cloze_line_longer_than_the_context_is_named_by_file_and_line(tmp_path):
    data = tmp_path / "t.txt"
    lines = [f"a line of text number {i}" for i in range(40)]
    lines[25] = "word " * 600
    data.write_text("\n".join(lines))
    result = _cli("--tasks", "cloze", "--data", str(data))
    assert result.exit_code == 1 and f"{data}:26: 60" in result.output, result.output
    assert "more than the model's context of 512" in result.output


@needs_lm_eval
def test_task_file_with_missing_fields_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: mine\ndataset_path: json\ndoc_to_text: '{{q}}'\noutput_type: multiple_choice\n")
    result = _cli("--tasks", str(bad))
    assert result.exit_code == 1 and f"{bad}: the task misses field(s) doc_to_target, doc_to_choice" in result.output


@needs_lm_eval
def test_unknown_task_and_unreachable_hub_task_are_one_line(monkeypatch):
    result = _cli("--tasks", "no_such_task_xyz")
    assert result.exit_code == 1 and "--tasks: unknown task 'no_such_task_xyz'" in result.output
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    result = _cli("--tasks", "arc_easy", "--limit", "2")
    if result.exit_code == 0:
        pytest.skip("arc_easy is in the local datasets cache")
    assert result.exit_code == 1 and "task arc_easy: its data could not be fetched" in result.output
    assert "HF_DATASETS_OFFLINE" in result.output and result.output.count("\n") <= 2


@needs_lm_eval
def test_context_that_cannot_be_cut_is_one_line(tmp_path):
    task = tmp_path / "long.yaml"
    (tmp_path / "long.jsonl").write_text(json.dumps({"q": "x", "choices": ["word " * 600, "b"], "gold": 0}) + "\n")
    task.write_text(TASK_YAML.read_text().replace("next_line.jsonl", "long.jsonl").replace("{{context}}", "{{q}}"))
    result = _cli("--tasks", str(task))
    assert result.exit_code == 1 and "its continuation has" in result.output and "context of 512" in result.output


@needs_lm_eval
def test_lm_eval_command_gives_the_numbers_of_evaluate(tmp_path):
    ours = tmp_path / "ours.json"
    result = _cli("--tasks", str(TASK_YAML), "-o", str(ours))
    assert result.exit_code == 0, result.output
    mine = json.loads(ours.read_text())["results"]["shakespeare_next_line"]
    lm_eval = shutil.which("lm_eval") or shutil.which("lm-eval")
    assert lm_eval, "lm-eval is importable but its command is not on PATH"
    cmd = [lm_eval, "--model", "openelm-mlx", "--model_args", f"model={DEMO_DIR}", "--tasks", TASK_YAML.name]
    done = subprocess.run(
        [*cmd, "--output_path", str(tmp_path / "theirs")], cwd=TASK_YAML.parent, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(next((tmp_path / "theirs").rglob("results_*.json")).read_text())
    theirs = theirs["results"]["shakespeare_next_line"]
    for key in ("acc,none", "acc_norm,none"):
        assert theirs[key] == mine[key]
    assert 0 < mine["acc,none"] < 1


@needs_lm_eval
def test_adapter_generate_until_uses_the_batch_engine(demo):
    from openelm_mlx.evaluate.harness import OpenELMLM, generation_config
    from openelm_mlx.generation.generate import generate

    model, tok = demo
    lm = OpenELMLM(model, tok, batch_size=2)
    requests = [("ROMEO:\n", {"until": ["\n"], "max_gen_toks": 12}), ("JULIET:\n", {"until": ["."], "max_gen_toks": 8})]
    got = lm.generate_until(requests)
    for (prompt, kwargs), text in zip(requests, got):
        assert text == generate(model, tok, prompt, config=generation_config(kwargs), chat=False)
        assert kwargs["until"][0] not in text
    with pytest.raises(OptionError, match="gen_kwargs: not supported: num_beams"):
        generation_config({"num_beams": 4})
    with pytest.raises(OptionError, match="batch_size"):
        OpenELMLM(model, tok, batch_size="0")


@needs_lm_eval
def test_adapter_adds_bos_once(demo, monkeypatch):
    from openelm_mlx.evaluate import harness

    model, tok = demo
    seen = []
    real = harness.loglikelihood
    monkeypatch.setattr(harness, "loglikelihood", lambda m, reqs, *a: seen.extend(reqs) or real(m, reqs, *a))
    out = harness.OpenELMLM(model, tok).loglikelihood([("", "ROMEO"), ("First Citizen:", " Speak")])
    assert len(out) == 2 and all(isinstance(ll, float) and isinstance(g, bool) for ll, g in out)
    assert all((ctx + cont).count(tok.bos_id) == 1 and ctx[0] == tok.bos_id for ctx, cont in seen)
