"""The BLAS loader (each case in a fresh process: loading is process-wide), `bench --json` and `info`."""

import ctypes.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import openelm_mlx.cli.bench  # noqa: F401  (registers bench and info)
from openelm_mlx.bench import blas
from openelm_mlx.cli import app
from openelm_mlx.model.config import OpenELMConfig

STATE = "import json, openelm_mlx; from openelm_mlx import blas; print(json.dumps(vars(blas.STATE)))"
BAD_SGEMM = "void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float al, const float *a, int lda,"
BAD_SGEMM += " const float *b, int ldb, float be, float *c, int ldc) { for (int i = 0; i < m * ldc; i++) c[i] = 1; }"


def loader_state(setting: str | None, code: str = STATE) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != blas.ENV}
    if setting is not None:
        env[blas.ENV] = setting
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def a_real_blas() -> str:
    found = next(blas.system_candidates(), None) or next(iter(blas.mkl_candidates()), None)
    if found is None:
        pytest.skip("no OpenBLAS, BLIS or MKL on this machine")
    return str(found)


def test_a_valid_library_from_the_environment_is_used():
    path = a_real_blas()
    state, err = loader_state(path)
    assert state["source"] == "env" and state["path"] == path, err


def test_a_library_without_cblas_sgemm_is_refused_with_a_clear_message():
    libc = ctypes.util.find_library("c") or "libc.so.6"
    state, err = loader_state(libc)
    assert state["source"] != "env" and state["path"] != libc
    assert f"{blas.ENV}={libc} has no cblas_sgemm" in err and "not used" in err


def test_a_library_whose_sgemm_is_wrong_is_refused(tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build a fake BLAS")
    (tmp_path / "bad.c").write_text(BAD_SGEMM)
    lib = tmp_path / "libbad.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "bad.c")], check=True)
    state, err = loader_state(str(lib))
    assert state["path"] != str(lib) and "gives wrong cblas_sgemm results" in err


def test_none_turns_the_loader_off():
    state, _ = loader_state("none")
    assert state["source"] == "off" and state["path"] is None


def test_nothing_is_loaded_once_mlx_is_imported():
    state, _ = loader_state(None, "import mlx.core\n" + STATE)
    assert state["source"] == "late" and "too late" in state["detail"]


def test_bench_writes_every_key(tmp_path):
    arch = tmp_path / "tiny.json"
    arch.write_text(json.dumps(OpenELMConfig.tiny().to_dict()))
    out = tmp_path / "bench.json"
    args = ["bench", "--arch-config", str(arch), "-p", "8", "-g", "4", "--repeats", "1", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("ours", "mlx_lm", "mlx_lm_cli"):
        assert set(data[key]) == {"prompt_tps", "generation_tps", "peak_memory_gb"} and data[key]["generation_tps"] > 0
    for key in ("ratio", "ratio_cli"):
        assert set(data[key]) == {"prompt", "generation"}
    assert set(data["decode_paired"]) == {"ours_tps", "mlx_lm_tps", "ratio"}
    assert set(data["roofline"]) == {"weight_bytes_per_token", "memory_read_gbps", "fraction"}
    assert data["blas"] and data["machine"] and "ratio_cli" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "OpenELM-270M", "-g", "1"], "--gen-tokens: must be >= 2"),
        (["--arch", "OpenELM-270M", "--repeats", "0"], "--repeats: must be >= 1"),
        (["--arch", "OpenELM-270M", "--dtype", "int8"], "--dtype: must be one of"),
        (["--arch", "OpenELM-270M", "--compare", "llama.cpp"], "--compare: must be mlx-lm or none"),
        (["--model", "m", "--arch", "OpenELM-270M"], "--model: give either --model or --arch"),
    ],
)
def test_bench_options_are_checked(args, message):
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_info_prints_every_field():
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    for field in ("mlx:", "device:", "blas:", "matmul:", "GFLOP/s", "memory:", "GB/s"):
        assert field in result.output
    assert f"blas: {blas.STATE.describe()}" in result.output  # the loader's own record, not a guess


def test_mlx_lm_cli_generation_is_counted_as_ours(monkeypatch, tmp_path):
    """mlx-lm reports g tokens over the time after the first; we count the g - 1 made in that time."""
    import subprocess

    from openelm_mlx.bench import speed as bench

    out = "Averages: prompt_tps=100.000, generation_tps=32.000, peak_memory=1.500\n"
    fake = subprocess.CompletedProcess([], 0, stdout=out, stderr="")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: fake)
    speed = bench.run_mlx_lm_cli(tmp_path, prompt_tokens=8, gen_tokens=32, repeats=1)
    assert (speed.prompt_tps, speed.generation_tps, speed.peak_memory_gb) == (100.0, 31.0, 1.5)


def test_bench_json_never_replaces_a_file_without_force(tmp_path):
    arch = tmp_path / "tiny.json"
    arch.write_text(json.dumps(OpenELMConfig.tiny().to_dict()))
    base = ["bench", "--arch-config", str(arch), "-p", "8", "-g", "2", "--repeats", "1", "--compare", "none"]
    mine = tmp_path / "notes.json"
    mine.write_text("my notes")
    result = CliRunner().invoke(app, [*base, "--json", str(mine)])
    assert result.exit_code == 1 and "--force: is needed to replace the existing file" in result.output
    assert mine.read_text() == "my notes" and "tok/s" not in result.output  # refused before any run
    result = CliRunner().invoke(app, [*base, "--json", str(tmp_path)])
    assert result.exit_code == 1 and "exists and is not a regular file" in result.output
    result = CliRunner().invoke(app, [*base, "--json", str(mine), "--force"])
    assert result.exit_code == 0 and set(json.loads(mine.read_text())) >= {"ours", "roofline"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
