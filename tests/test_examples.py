"""Every script in examples/ runs to completion (so the examples never rot)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_every_example_is_tested():
    tested = {
        name.removeprefix("test_").removesuffix("_example") + ".py" for name in globals() if name.endswith("_example")
    }
    assert {p.name for p in EXAMPLES.glob("*.py")} <= tested


def test_generate_example():
    out = _run(str(EXAMPLES / "generate.py"))
    assert "generation tokens/s" in out and "JULIET:" in out


def test_engine_example():
    out = _run(str(EXAMPLES / "engine.py"))
    assert "[cancelled: cancelled" in out and "[late: length, 16 tokens]" in out
    assert int(out.split("follow-up reused ")[1].split()[0]) > 0


def test_decode_loop_example():
    assert "same tokens as the eager model: True" in _run(str(EXAMPLES / "decode_loop.py"))


def test_chat_example():
    assert _run(str(EXAMPLES / "chat.py")).count("tokens in the KV cache") == 2


def test_convert_example():
    out = _run(str(EXAMPLES / "convert.py"))
    assert "round trip gives identical logits: True" in out and "bits per weight" in out


def test_quantize_example():
    out = _run(str(EXAMPLES / "quantize.py"))
    saved = float(out.split("reloaded perplexity ")[1].split()[0])
    mixed = float(out.split("mixed_3_6: ")[1].split("perplexity ")[1].split(",")[0])
    assert "4-bit: 5.03 bits per weight" in out and saved == mixed  # the saved model is the one measured


def test_lora_example():
    out = _run(str(EXAMPLES / "lora.py"))
    assert "moon" in out.lower() or "adapter" in out.lower()


def test_finetune_example():
    out = _run(str(EXAMPLES / "finetune.py"))
    assert "tuned:     the moon is made of cheese" in out and "held-out loss" in out


def test_serve_example():
    assert "assistant:" in _run(str(EXAMPLES / "serve.py"))


def test_pretrain_example_without_shared_data(tmp_path):
    out = _run(str(EXAMPLES / "pretrain.py"))  # no arguments: finds ../shared or writes its own corpus
    assert "held-out loss" in out


def test_pretrain_example(shakespeare_path, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(shakespeare_path.read_text()[:200_000])
    out = _run(str(EXAMPLES / "pretrain.py"), str(small), str(tmp_path / "run"))
    assert "held-out loss" in out and (tmp_path / "run" / "model.safetensors").is_file()


def test_gguf_export_example():
    out = _run(str(EXAMPLES / "gguf_export.py"), "--outtype", "q8_0")
    assert "model.gguf" in out and "round trip: logits within" in out and "ours:" in out
    lines = dict(line.split(":", 1) for line in out.splitlines() if line.startswith(("ours:", "llama.cpp:")))
    assert "skipped" in lines["llama.cpp"] or lines["llama.cpp"].strip() == lines["ours"].strip()  # same greedy text


def test_evaluate_example():
    out = _run(str(EXAMPLES / "evaluate.py"))
    assert "next_line.yaml: acc 0." in out and "cloze on 9 lines" in out
