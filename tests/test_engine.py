"""The generation engine: rows that join and leave a running batch get exactly the answers they get alone, with their
own settings, seeds, stops, cancellation and failures; the server's worker and the CLI on top of it."""

from __future__ import annotations

import json
import threading

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from openelm_mlx.cli._app import app
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.errors import OptionError
from openelm_mlx.folders.io import load
from openelm_mlx.generation.engine import Engine, Row
from openelm_mlx.generation.generate import generate
from openelm_mlx.generation.settings import GenerationConfig

TEXTS = [
    "ROMEO:",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "JULIET: O Romeo, Romeo!",
    "KING RICHARD III:\nNow is the winter of our discontent",
    "MENENIUS:",
    "Second Citizen:\nWe are accounted poor citizens, the patricians good.",
    "QUEEN:",
    "HAMLET: To be",
]


@pytest.fixture(scope="module")
def demo():
    return load(DEMO_DIR)


def rows_for(tok, texts, config, **kw):
    return [Row(tok.encode(t), config, frozenset({tok.eos_id}), **kw) for t in texts]


def alone(model, row: Row) -> list[int]:
    solo = Row(row.prompt, row.config, row.eos_ids)
    Engine(model, max_batch=1).run([solo])
    return solo.tokens


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batched_answers_equal_each_request_alone_at_temperature_zero(demo, batch):
    """Prompts of different lengths; half join while the others are mid-answer."""
    model, tok = demo
    config = GenerationConfig(max_tokens=24)
    rows = rows_for(tok, TEXTS, config)
    engine = Engine(model, max_batch=batch, prefill_chunk=8)
    for row in rows[:4]:
        engine.add(row)
    for _ in range(6):
        engine.step()
        assert engine.stats.active <= batch
    for row in rows[4:]:
        engine.add(row)
    while engine.busy:
        engine.step()
        assert engine.stats.active <= batch
    assert all(r.finish_reason in ("eos", "length") for r in rows)
    assert [r.tokens for r in rows] == [alone(model, r) for r in rows]


def test_a_seed_gives_the_same_answer_alone_or_batched(demo):
    model, tok = demo
    seeded = GenerationConfig(max_tokens=20, temp=1.0, top_p=0.9, seed=7)
    rows = rows_for(tok, TEXTS[:3], seeded) + rows_for(tok, TEXTS[3:6], GenerationConfig(max_tokens=20, temp=0.8))
    Engine(model, max_batch=6).run(rows)
    assert [r.tokens for r in rows[:3]] == [alone(model, r) for r in rows[:3]]
    other = rows_for(tok, TEXTS[:1], seeded.replace(seed=8))[0]
    assert alone(model, other) != rows[0].tokens  # the seed matters


def test_generation_leaves_mlx_global_random_state_alone(demo):
    model, tok = demo
    mx.random.seed(123)
    expected = mx.random.uniform(shape=(4,))
    mx.random.seed(123)
    generate(model, tok, ["ROMEO:", "JULIET:"], max_tokens=5, temp=1.0, seed=3)
    generate(model, tok, "ROMEO:", max_tokens=5, temp=1.0, seed=4)
    generate(model, tok, "ROMEO:", max_tokens=5, temp=1.0, seed=4, kv_bits=8, kv_group_size=32)  # mlx-lm's loop
    generate(model, tok, "ROMEO:", max_tokens=5, temp=1.0, seed=4, draft_model=model)
    assert mx.array_equal(mx.random.uniform(shape=(4,)), expected)
    a = generate(model, tok, "ROMEO:", max_tokens=12, temp=1.0, seed=4, draft_model=model)
    assert a == generate(model, tok, "ROMEO:", max_tokens=12, temp=1.0, seed=4, draft_model=model)


def test_per_row_settings_stop_strings_and_max_tokens(demo):
    model, tok = demo
    short = GenerationConfig(max_tokens=3)
    penalised = GenerationConfig(max_tokens=24, repetition_penalty=1.5)
    answers = generate(model, tok, TEXTS[:2], max_tokens=24)
    rows = rows_for(tok, TEXTS[:1], short) + rows_for(tok, TEXTS[1:2], penalised)
    Engine(model, max_batch=2).run(rows)
    assert len(rows[0].tokens) == 3 and rows[0].finish_reason == "length"
    assert rows[1].tokens == alone(model, rows[1])
    cut = answers[0][5:9]
    stopped = generate(model, tok, [TEXTS[0], TEXTS[1]], max_tokens=24, stop=(cut,))
    assert stopped[0] == answers[0][: answers[0].index(cut)]


def test_cancel_frees_the_row_at_once_and_the_others_go_on(demo):
    model, tok = demo
    config = GenerationConfig(max_tokens=40)
    rows = rows_for(tok, TEXTS[:3], config)
    engine = Engine(model, max_batch=3)
    for r in rows:
        engine.add(r)
    for _ in range(4):
        engine.step()
    engine.cancel(rows[1])
    finished = engine.step()
    assert rows[1] in finished and rows[1].finish_reason == "cancelled"
    assert engine.stats.active == 2 and rows[1] not in engine.rows
    while engine.busy:
        engine.step()
    assert rows[0].tokens == alone(model, rows[0]) and rows[2].tokens == alone(model, rows[2])
    queued = rows_for(tok, TEXTS[:1], config)[0]
    engine.add(queued)
    engine.cancel(queued)
    assert queued in engine.step() and not engine.busy


def test_a_failure_in_one_row_ends_that_row_only(demo):
    model, tok = demo
    config = GenerationConfig(max_tokens=16)

    def explode(row: Row, token: int) -> bool:
        if len(row.tokens) == 3:
            raise RuntimeError("injected failure")
        return False

    rows = rows_for(tok, TEXTS[:4], config)
    rows[2].on_token = explode
    Engine(model, max_batch=4).run(rows)
    assert rows[2].finish_reason == "error" and "injected" in str(rows[2].error)
    assert [r.tokens for i, r in enumerate(rows) if i != 2] == [alone(model, r) for i, r in enumerate(rows) if i != 2]


def test_the_prompt_cache_reuses_the_longest_prefix_and_answers_the_same(demo):
    model, tok = demo
    config = GenerationConfig(max_tokens=12)
    engine = Engine(model, max_batch=4, prompt_cache_size=4)
    first = rows_for(tok, [TEXTS[1]], config)[0]
    engine.run([first])
    follow = tok.encode(TEXTS[1]) + first.tokens + tok.encode(" And more", add_bos=False)
    warm = Row(follow, config, first.eos_ids)
    engine.run([warm])
    assert warm.cached_tokens >= len(first.prompt)
    assert warm.tokens == alone(model, warm)


def test_rows_continuing_cached_prefixes_are_fed_together_and_answer_as_alone(demo):
    """Prefixes of different lengths, rests of different lengths (right-padded, then moved right), and a fresh
    prompt, admitted in one step: one prefill, one join, and every answer equal to the same request alone."""
    model, tok = demo
    config = GenerationConfig(max_tokens=16)
    engine = Engine(model, max_batch=8, prompt_cache_size=8)
    engine.run(rows_for(tok, [TEXTS[1], TEXTS[3], TEXTS[5]], config))
    prompts = [
        tok.encode(TEXTS[1] + " And then the people rose"),
        tok.encode(TEXTS[3] + " made glorious"),
        tok.encode(TEXTS[5] + " What authority surfeits on would relieve us: if they"),
        tok.encode(TEXTS[1]),  # all cached: its last token is fed again
        tok.encode(TEXTS[6], add_bos=False),  # nothing cached (every cached prompt starts with BOS)
    ]
    rows = [Row(p, config, frozenset({tok.eos_id})) for p in prompts]
    for row in rows:
        engine.add(row)
    engine.step()
    assert len(engine.prefills) + (len(engine.rows) > 0) == 1  # one prefill (or already joined), not one per row
    while engine.busy:
        engine.step()
    assert [r.cached_tokens > 0 for r in rows] == [True, True, True, True, False]
    assert [r.tokens for r in rows] == [alone(model, r) for r in rows]


def test_engine_settings_are_checked(demo):
    model, tok = demo
    with pytest.raises(OptionError, match="max_batch"):
        Engine(model, max_batch=0)
    with pytest.raises(OptionError, match="prefill_chunk"):
        Engine(model, prefill_chunk=0)
    with pytest.raises(OptionError, match="kv_bits"):
        Engine(model).add(Row([1, 2], GenerationConfig(kv_bits=8), frozenset({2})))
    with pytest.raises(OptionError, match="stop: needs the row's text"):
        Engine(model).add(Row([1, 2], GenerationConfig(stop=("x",)), frozenset({2})))
    with pytest.raises(OptionError, match="token ids"):
        Engine(model).add(Row([1, 10**9], GenerationConfig(), frozenset({2})))


def test_worker_ends_a_failing_request_with_an_error_and_serves_the_rest(demo, monkeypatch):
    """A failure inside one row of a batch of 4: that request fails (the server answers 500), the others finish."""
    from openelm_mlx.serve import worker as worker_module
    from openelm_mlx.serve.requests import GenRequest

    model, tok = demo
    marker = tok.encode(TEXTS[2])

    class Flaky(worker_module.TextStream):
        def __init__(self, tokenizer, prompt_ids, config):
            super().__init__(tokenizer, prompt_ids, config)
            self.flaky = list(prompt_ids) == marker

        def add(self, token):
            if self.flaky and self.n == 2:
                raise RuntimeError("injected failure")
            return super().add(token)

    monkeypatch.setattr(worker_module, "TextStream", Flaky)
    worker = worker_module.Worker(lambda: (model, tok, None), worker_module.EngineSettings(max_batch=4))
    worker.start()
    events: list[list] = [[] for _ in range(4)]
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(event):
            events[i].append(event)
            if not isinstance(event, worker_module.Piece):
                done.release()

        return emit

    config = GenerationConfig(max_tokens=12)
    for i, text in enumerate(TEXTS[:4]):
        worker.submit(worker_module.Job(GenRequest("completion", tok.encode(text), config), emitter(i)))
    for _ in range(4):
        assert done.acquire(timeout=60)
    worker.stop()
    ends = [e[-1] for e in events]
    assert isinstance(ends[2], worker_module.Failed) and "injected" in str(ends[2].error)
    for i in (0, 1, 3):
        text = "".join(p.text for p in events[i][:-1]) + ends[i].text
        assert isinstance(ends[i], worker_module.Done) and text == generate(model, tok, TEXTS[i], max_tokens=12)
    assert worker.stats["failed"] == 1 and worker.stats["served"] == 3


def test_cli_generates_several_prompts_in_order(tmp_path, demo):
    model, tok = demo
    answers = [generate(model, tok, t, max_tokens=10) for t in TEXTS[:3]]
    args = ["generate", "--max-tokens", "10"]
    result = CliRunner().invoke(app, [*args, "--prompt", TEXTS[0], "--prompt", TEXTS[2]])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [answers[0].replace("\n", "\\n"), answers[2].replace("\n", "\\n")]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(t.replace("\n", " ") for t in TEXTS[:3]) + "\n\n")
    result = CliRunner().invoke(app, [*args, "--prompts-file", str(prompts), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == [t.replace("\n", " ") for t in TEXTS[:3]]
    assert lines[0]["text"] == answers[0] and lines[0]["finish_reason"] in ("eos", "length")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "a", "--json"], "--json: takes effect with several prompts"),
        (["--prompts-file", "MISSING"], "MISSING"),
        (["--prompt", "a", "--prompt", "b", "--draft-model", "x"], "--draft-model: is a single-prompt feature"),
    ],
)
def test_cli_several_prompts_bad_input(args, message):
    result = CliRunner().invoke(app, ["generate", *args])
    assert result.exit_code == 1 and message in result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"one\0two\n", "holds NUL bytes"),
        (b"caf\xe9\n", "is not UTF-8 text (byte 3)"),
        (b"first\n\nthird\n", "prompts.txt:2: an empty line"),
        (b"short\n" + b"word " * 600 + b"\n", "prompts.txt:2: the prompt has"),
        (b"\n \n", "holds no prompt"),
    ],
)
def test_cli_prompts_file_is_checked_line_by_line(tmp_path, content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    result = CliRunner().invoke(app, ["generate", "--max-tokens", "2", "--prompts-file", str(prompts)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output


def test_cli_prompts_file_from_stdin_and_empty_stop(demo):
    model, tok = demo
    answers = [generate(model, tok, t, max_tokens=6) for t in ("ROMEO:", "JULIET:")]
    result = CliRunner().invoke(app, ["generate", "--max-tokens", "6", "--prompts-file", "-", "--json"],
                                input="ROMEO:\nJULIET:\n\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["text"] for line in result.stdout.splitlines()] == answers
    odd = "\ufeffROMEO: a\x0cb\u2028c\r\nJULIET:\n".encode()  # a BOM, a form feed, U+2028, CRLF
    result = CliRunner().invoke(app, ["generate", "--max-tokens", "1", "--prompts-file", "-", "--json"], input=odd)
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("\n")[:-1]  # (str.splitlines would split the JSON at U+2028 too)
    assert [json.loads(line)["prompt"] for line in lines] == ["ROMEO: a\x0cb\u2028c", "JULIET:"]
    twice = CliRunner().invoke(app, ["generate", "--prompt", "-", "--prompts-file", "-"], input="x\n")
    assert twice.exit_code == 1 and "'-' (stdin) can be given once" in twice.output
    empty = CliRunner().invoke(app, ["generate", "--prompt", "x", "--stop", ""])
    assert empty.exit_code == 1 and "--stop: is empty" in empty.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-batch", "0"], "--max-batch: must be >= 1"),
        (["--prefill-chunk", "0"], "--prefill-chunk: must be >= 1"),
        (["--prompt-cache-bytes", "1000"], "--prompt-cache-bytes: 1000 is smaller than one full-context prompt"),
        (["--api-key", "line\nbreak"], "--api-key: must be visible ASCII"),
        (["--api-key", "clé"], "--api-key: must be visible ASCII"),
    ],
)
def test_serve_engine_options_are_checked(args, message):
    from tests.test_server import free_port

    result = CliRunner().invoke(app, ["serve", "--port", str(free_port()), *args])
    assert result.exit_code == 1 and message in result.output


def test_chat_refuses_a_turn_past_the_context_and_goes_on_after_reset(demo):
    import dataclasses

    from openelm_mlx.generation.chat import ChatSession

    model, tok = demo
    small = load(DEMO_DIR)[0]
    small.config = dataclasses.replace(model.config, max_context_length=64)
    session = ChatSession(small, tok, max_tokens=8)
    list(session.send("Hi"))
    with pytest.raises(OptionError, match="past the model's context of 64"):
        list(session.send("word " * 60))
    list(session.send("Again"))  # the session is still usable: the refused turn left nothing behind
    session.reset()
    assert "".join(s.text for s in session.send("Hi")) == generate(small, tok, [{"role": "user", "content": "Hi"}],
                                                                    max_tokens=8)  # fmt: skip


def test_cli_refuses_a_prompt_past_the_context_in_one_line(tmp_path, demo):
    import dataclasses

    from openelm_mlx.folders.io import save

    model, tok = demo
    small = load(DEMO_DIR)[0]
    small.config = dataclasses.replace(model.config, max_context_length=64)
    save(small, tmp_path / "small", tokenizer=tok)
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "small"), "--prompt", "word " * 2000])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: --prompt: has 2002 tokens; the model's context is 64")


def test_rows_the_engine_cannot_honour_or_that_fill_the_context(demo):
    import dataclasses

    model, tok = demo
    with pytest.raises(OptionError, match="top_k: must be below the vocabulary size"):
        Engine(model).add(Row([1, 2], GenerationConfig(top_k=model.config.vocab_size), frozenset({2})))
    small = load(DEMO_DIR)[0]
    small.config = dataclasses.replace(model.config, max_context_length=24)
    row = Row(tok.encode("ROMEO:"), GenerationConfig(max_tokens=500), frozenset())
    Engine(small).run([row])
    assert row.finish_reason == "length" and len(row.prompt) + len(row.tokens) == 24


def test_a_row_cancelled_while_its_prompt_is_fed_stops_being_fed(demo):
    model, tok = demo
    row = Row(tok.encode("word " * 200), GenerationConfig(max_tokens=4), frozenset({tok.eos_id}))
    engine = Engine(model, prefill_chunk=8)
    engine.add(row)
    engine.step()
    engine.cancel(row)
    assert row in engine.step() and not engine.busy


def test_an_identical_prompt_reuses_all_but_its_last_token(demo):
    model, tok = demo
    config = GenerationConfig(max_tokens=6)
    engine = Engine(model, prompt_cache_size=4)
    prompt = tok.encode(TEXTS[1])
    engine.run([Row(prompt, config, frozenset({tok.eos_id}))])
    again = Row(prompt, config, frozenset({tok.eos_id}))
    engine.run([again])
    assert again.cached_tokens == len(prompt) - 1 and again.tokens == alone(model, again)


def test_an_answer_cut_off_by_a_full_context_ends_with_length(demo):
    """Not "eos"/"stop": the engine ended it because the model's context is full (the server maps this to OpenAI's
    "length" too)."""
    from openelm_mlx.generation.generate import generate_batch, stream_generate

    model, tok = demo
    context = model.config.max_context_length
    ids = tok.encode("ROMEO: " * 400)[: context - 3]
    last = list(stream_generate(model, tok, ids, max_tokens=100))[-1]
    assert (last.finish_reason, last.generation_tokens) == ("length", 3)
    reasons: list[str] = []
    generate_batch(
        model, tok, [ids, tok.encode("ROMEO:")], config=GenerationConfig(max_tokens=4), finish_reasons=reasons
    )
    assert reasons[1] == "length"
    reasons.clear()
    generate_batch(model, tok, [ids, ids[:-1]], config=GenerationConfig(max_tokens=100), finish_reasons=reasons)
    assert reasons == ["length", "length"]
