"""Generation: greedy = argmax of full forwards, speculative = plain, seeds, batches, stops, chat, CLI."""

import json

import mlx.core as mx
import pytest
from helpers import random_model
from typer.testing import CliRunner

from openelm_mlx import load, save
from openelm_mlx.cli import app
from openelm_mlx.errors import OptionError
from openelm_mlx.generation.chat import ChatSession, chat_turn_ids
from openelm_mlx.generation.generate import StopStrings, generate, generate_tokens, stream_generate
from openelm_mlx.generation.template import render_chat
from openelm_mlx.generation.tokenizer import Tokenizer
from openelm_mlx.model.config import OpenELMConfig

TINY = dict(vocab_size=32000, model_dim=64, head_dim=32, max_context_length=1024)


@pytest.fixture(scope="module")
def model():
    return random_model(OpenELMConfig.tiny(**TINY), seed=1)


@pytest.fixture(scope="module")
def draft():
    return random_model(OpenELMConfig.tiny(**{**TINY, "num_transformer_layers": 2}), seed=2)


@pytest.fixture
def tok(llama_tokenizer_path):
    return Tokenizer(llama_tokenizer_path)


def _argmax_reference(model, ids, n):
    seq, out = list(ids), []
    for _ in range(n):
        t = int(mx.argmax(model(mx.array([seq]))[0, -1]).item())
        if t == 2:
            break
        out.append(t)
        seq.append(t)
    return out


def test_greedy_equals_argmax_of_full_forwards(model):
    ids = [1, 15043, 3186, 29892, 445, 338]
    assert list(generate_tokens(model, ids, max_tokens=24)) == _argmax_reference(model, ids, 24)


def test_long_prompt_is_prefilled_in_chunks_and_matches(model):
    ids = [1] + [(i * 7919) % 31000 + 3 for i in range(700)]  # > one 512-token prefill chunk
    assert list(generate_tokens(model, ids, max_tokens=6)) == _argmax_reference(model, ids, 6)


def test_speculative_equals_plain_at_temp_zero(model, draft):
    ids = [1, 450, 4996, 17354, 1701]
    plain = list(generate_tokens(model, ids, max_tokens=30))
    assert list(generate_tokens(model, ids, max_tokens=30, draft_model=draft, num_draft_tokens=3)) == plain
    assert list(generate_tokens(model, ids, max_tokens=30, draft_model=model, num_draft_tokens=4)) == plain


def test_same_seed_same_sample(model):
    ids = [1, 450, 4996]
    a = list(generate_tokens(model, ids, max_tokens=20, temp=1.0, seed=11))
    assert a == list(generate_tokens(model, ids, max_tokens=20, temp=1.0, seed=11))
    assert a != list(generate_tokens(model, ids, max_tokens=20, temp=1.0, seed=12))
    assert a != list(generate_tokens(model, ids, max_tokens=20))


def test_quantized_and_rotating_kv_caches_generate(model):
    ids = [1, 450, 4996, 17354]
    greedy = list(generate_tokens(model, ids, max_tokens=12))
    assert list(generate_tokens(model, ids, max_tokens=12, kv_bits=8, kv_group_size=32))[:3] == greedy[:3]
    assert list(generate_tokens(model, ids, max_tokens=12, max_kv_size=64)) == greedy  # window larger than the run
    with pytest.raises(ValueError, match="must divide the model's head_dim 32"):
        list(generate_tokens(model, ids, max_tokens=2, kv_bits=4, kv_group_size=64))


def test_chat_template_two_turns_with_system(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
    ]
    assert render_chat(messages) == (
        "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
        "<|user|>\nName a color.</s>\n<|assistant|>\n"
    )
    ids = tok.apply_chat_template(messages)
    assert ids[0] == 1 and ids.count(2) == 4  # EOS is the id, never the text
    assert "</s" not in "".join(tok.sp.id_to_piece(i) for i in ids if i != 2)  # not spelled out as text
    assert tok.decode(ids).replace(" ", "") == render_chat(messages).replace("</s>", "").replace(" ", "")


def test_streaming_never_breaks_utf8(tok):
    text = "Emoji 🦙🚀 and 中文字符 and Ελληνικά"
    ids = tok.encode(text, add_bos=False)
    assert any(tok.sp.is_byte(i) for i in ids)  # byte-fallback pieces are exercised
    detok = tok.detokenizer()
    pieces = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_tokenizer_reproduces_the_llama_test_vectors(tok, llama_tokenizer_path):
    vectors = [json.loads(line) for line in (llama_tokenizer_path.parent / "tests.jsonl").read_text().splitlines()]
    assert len(vectors) == 46
    for v in vectors:
        assert tok.encode(v["text"], add_bos=False) == v["ids"], v["text"]
        assert tok.encode(v["text"])[0] == 1
        detok = tok.detokenizer()
        assert "".join(detok.add_token(i) for i in v["ids"]) + detok.finalize() == tok.decode(v["ids"])


def test_stop_strings_hold_back_and_cut():
    stops = StopStrings(["END", "\n\n"])
    assert stops.feed("abc E") == "abc "  # "E" could start "END"
    assert stops.feed("N") == ""
    assert stops.feed("D tail") == "" and stops.stopped
    assert StopStrings(["END"]).feed("no stop here") == "no stop here"


def test_stop_string_ends_generation(model, tok):
    full = generate(model, tok, "Hello", max_tokens=20)
    cut = full[len(full) // 2 : len(full) // 2 + 3]
    assert cut and cut in full
    out = generate(model, tok, "Hello", max_tokens=20, stop=[cut])
    assert out == full[: full.index(cut)]


def test_batch_equals_one_by_one(model, tok):
    prompts = ["Hello world, this is", "A", "The quick brown fox jumps over the lazy"]
    assert generate(model, tok, prompts, max_tokens=12) == [generate(model, tok, p, max_tokens=12) for p in prompts]


def test_prompt_longer_than_context_is_refused_everywhere(tok):
    small = random_model(OpenELMConfig.tiny(**{**TINY, "max_context_length": 8}))
    long = "one two three four five six seven eight nine ten"
    with pytest.raises(OptionError, match="has 11 tokens; the model's context is 8 tokens"):
        list(stream_generate(small, tok, long, max_tokens=2))
    with pytest.raises(OptionError, match="has 11 tokens; the model's context is 8 tokens"):
        generate(small, tok, [long, "one"], max_tokens=2)
    assert isinstance(generate(small, tok, "one", max_tokens=2), str)


def test_chat_turn_ids_equal_the_tail_of_the_whole_template(tok):
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    nxt = [{"role": "user", "content": "And then?"}]
    before = tok.apply_chat_template(history, add_generation_prompt=False)
    assert before[-3:] == [2, 29871, 13]  # ... EOS, then the "\n" that the next turn's text continues
    assert tok.apply_chat_template(history + nxt) == before[:-2] + chat_turn_ids(tok, nxt, after_eos=True)


def test_chat_session_feeds_only_new_tokens_and_answers_like_a_fresh_run(model, llama_tokenizer_path):
    tok = Tokenizer(llama_tokenizer_path, chat_template=True)
    session = ChatSession(model, tok, system="Be brief.", max_tokens=8)
    first_ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    list(session.send("Hi"))
    answer = list(generate_tokens(model, first_ids, max_tokens=8))
    # The cache holds every token fed: all of the answer but its last token (an EOS that ended it is never fed).
    assert session.cache[0].offset == len(first_ids) + len(answer) - (not session.after_eos)
    assert session.history == first_ids + answer + ([2] if session.after_eos else [])
    turn = chat_turn_ids(tok, [{"role": "user", "content": "And then?"}], session.after_eos)
    second = "".join(s.text for s in session.send("And then?"))
    assert session.cache[0].offset >= len(first_ids) + len(answer) + len(turn)
    history = first_ids + answer + ([2] if session.after_eos else []) + turn
    detok = tok.detokenizer()
    fresh = "".join(detok.add_token(t) for t in generate_tokens(model, history, max_tokens=8)) + detok.finalize()
    assert second == fresh
    session.reset()
    assert session.cache[0].offset == 0


@pytest.fixture
def saved_model(tmp_path, model, llama_tokenizer_path):
    save(model, tmp_path / "tiny-Instruct", tokenizer=Tokenizer(llama_tokenizer_path, chat_template=True))
    return tmp_path / "tiny-Instruct"


def test_cli_generate_streams_only_text_to_stdout(saved_model, model):
    _, tok = load(saved_model)
    expected = generate(model, tok, "Hello there", max_tokens=10)
    result = CliRunner().invoke(
        app, ["generate", "--model", str(saved_model), "--prompt", "Hello there", "--max-tokens", "10", "--verbose"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    assert "generation: 10 tokens" in result.stderr and "peak memory" in result.stderr
    piped = CliRunner().invoke(
        app, ["generate", "--model", str(saved_model), "--prompt", "-", "--max-tokens", "10"], input="Hello there"
    )
    assert piped.stdout == expected + "\n"


def test_cli_generate_with_draft_model_reports_acceptance(saved_model, tmp_path, draft, llama_tokenizer_path):
    save(draft, tmp_path / "draft", tokenizer=Tokenizer(llama_tokenizer_path))
    plain = CliRunner().invoke(app, ["generate", "--model", str(saved_model), "--prompt", "Hi", "--max-tokens", "12"])
    spec = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(saved_model),
            "--prompt",
            "Hi",
            "--max-tokens",
            "12",
            "--draft-model",
            str(tmp_path / "draft"),
            "--verbose",
        ],
    )
    assert spec.exit_code == 0, spec.output
    assert spec.stdout == plain.stdout and "draft tokens accepted:" in spec.stderr


def test_cli_chat_turns_reset_and_exit(saved_model):
    result = CliRunner().invoke(
        app, ["chat", "--model", str(saved_model), "--max-tokens", "5"], input="Hi\nAnd you?\n/reset\nHi\n/exit\n"
    )
    assert result.exit_code == 0, result.output
    answers = [line for line in result.stdout.replace(">>> ", "").splitlines() if line.strip()]
    assert len(answers) == 3 and answers[0] == answers[2]  # after /reset, the same first answer
    assert "(conversation reset)" in result.stderr


def test_missing_tokenizer_says_how_to_add_one(tmp_path, model):
    save(model, tmp_path / "no-tok")
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "no-tok"), "--prompt", "Hi"])
    assert result.exit_code == 1
    assert "--tokenizer hf-internal-testing/llama-tokenizer" in result.stderr and "Traceback" not in result.output


def test_interrupted_answer_leaves_a_consistent_cache(model, llama_tokenizer_path):
    """Ctrl-C mid-answer: the next turn answers exactly as a fresh run over what was kept."""
    tok = Tokenizer(llama_tokenizer_path, chat_template=True)
    session = ChatSession(model, tok, max_tokens=12)
    first_ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    answer = session.send("Hi")
    shown = [next(answer).token for _ in range(3)]
    answer.close()  # what the CLI does on KeyboardInterrupt
    # every token fed is kept: the prompt and the answer but its last shown token (fed with the next turn)
    assert {c.offset for c in session.cache} == {len(first_ids) + 2} and not session.after_eos
    turn = chat_turn_ids(tok, [{"role": "user", "content": "Go on"}], after_eos=False)
    assert turn[0] == 2  # the cut answer is closed with EOS first
    second = [s.token for s in session.send("Go on") if s.token >= 0]
    assert second == list(generate_tokens(model, first_ids + shown + turn, max_tokens=12))


def test_rotating_cache_keeps_generating_past_its_window(model):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model, max_kv_size=16)
    out = list(generate_tokens(model, [1, 450, 4996, 17354], max_tokens=40, prompt_cache=cache, eos_ids=[]))
    assert len(out) == 40
    assert cache[0].keys.shape[2] <= 16  # memory stays bounded by the window


def test_instruct_is_decided_by_the_record_first_then_the_name(tmp_path, model, llama_tokenizer_path):
    from openelm_mlx.generation.tokenizer import uses_chat_template

    plain = tmp_path / "my-Instruct-copy"
    save(model, plain, tokenizer=Tokenizer(llama_tokenizer_path, chat_template=False))
    assert uses_chat_template(plain, plain.name) is False  # recorded: no template, whatever the name says
    assert load(plain)[1].chat_template is False
    assert uses_chat_template(None, "apple/OpenELM-270M-Instruct") is True  # no record: the name decides
    assert uses_chat_template(tmp_path / "missing", "OpenELM-270M") is False


def test_cli_dtype_casts_and_the_float32_hint(tmp_path, model, llama_tokenizer_path, monkeypatch):
    """A bfloat16 model on the CPU next to a fast BLAS gets one note pointing at --dtype float32, after it loads;
    with the option it generates what the float32-cast model generates, and the note is gone."""
    from openelm_mlx.bench import blas
    from openelm_mlx.folders.io import cast_floating

    half = random_model(OpenELMConfig.tiny(**TINY), seed=1)
    cast_floating(half, mx.bfloat16)
    save(half, tmp_path / "bf16", tokenizer=Tokenizer(llama_tokenizer_path))
    monkeypatch.setattr(blas.STATE, "path", "/usr/lib/libmkl_rt.so")
    device = mx.default_device()
    mx.set_default_device(mx.cpu)  # the note is about MLX's CPU backend
    try:
        args = ["generate", "--model", str(tmp_path / "bf16"), "--prompt", "Hello", "--max-tokens", "8"]
        noted = CliRunner().invoke(app, args)
        assert noted.exit_code == 0, noted.output
        assert "note: bfloat16 runs several times slower than float32" in noted.stderr
        wide = CliRunner().invoke(app, [*args, "--dtype", "float32"])
        assert wide.exit_code == 0, wide.output
        assert "note:" not in wide.stderr
        cast, tok = load(tmp_path / "bf16", dtype="float32")
        assert wide.stdout == generate(cast, tok, "Hello", max_tokens=8) + "\n"
        failed = CliRunner().invoke(app, [*args, "--adapter-path", str(tmp_path / "missing")])
        assert failed.exit_code == 1 and "note:" not in failed.output  # a failed load is one error line only
        monkeypatch.setattr(blas.STATE, "path", None)  # the reference BLAS: float32 is no faster
        assert "note:" not in CliRunner().invoke(app, args).stderr
    finally:
        mx.set_default_device(device)


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_cli_unknown_dtype_is_one_line_before_anything_else(command):
    """Checked with the other options: before stdin is read, the demo is announced, or serve takes its port (held
    here, so a later check would report the port instead)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        args = {"generate": ["--prompt", "-"], "chat": [], "serve": ["--port", port]}[command]
        result = CliRunner().invoke(app, [command, "--dtype", "int4", *args], input="Hi\n/exit\n")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: --dtype: must be one of float32, float16, bfloat16, got 'int4'"]
