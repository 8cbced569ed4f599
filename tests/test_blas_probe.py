"""A BLAS named by OPENELM_MLX_BLAS that crashes or hangs: probed in a child, refused, the verdict cached;
`--help` loads no BLAS at all. Each case runs in a fresh process (loading is process-wide)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from openelm_mlx.bench import blas

STATE = "import json, openelm_mlx; from openelm_mlx import blas; print(json.dumps(vars(blas.STATE)))"
CONSTRUCTOR = "__attribute__((constructor)) static void on_load(void) { %s }\n"
SGEMM = "void cblas_sgemm(void) {}\n"
LIBRARIES = {
    "crash": CONSTRUCTOR % "volatile int *p = 0; *p = 1;" + SGEMM,
    "hang": "#include <unistd.h>\n" + CONSTRUCTOR % "for (;;) pause();" + SGEMM,
}


@pytest.fixture
def fake_blas(tmp_path):
    """`fake_blas(kind)`: the path of a compiled library that crashes or hangs when loaded."""
    if sys.platform != "linux":
        pytest.skip("the BLAS loader works on Linux only")
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build a fake BLAS (apt-get install gcc)")

    def build(kind):
        (tmp_path / f"{kind}.c").write_text(LIBRARIES[kind])
        lib = tmp_path / f"lib{kind}.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / f"{kind}.c")], check=True)
        return str(lib)

    return build


def run_with(lib, cache, *args, code=STATE, timeout="3"):
    env = {**os.environ, blas.ENV: lib, blas.TIMEOUT_ENV: timeout, "XDG_CACHE_HOME": str(cache)}
    cmd = [sys.executable, "-m", "openelm_mlx", *args] if args else [sys.executable, "-c", code]
    tic = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    return done, time.perf_counter() - tic


@pytest.mark.parametrize(
    "kind, timeout, reason", [("crash", "60", "crashes when loaded or called (SIGSEGV)"), ("hang", "1", "within 1 s")]
)
def test_a_library_that_crashes_or_hangs_is_refused_once_and_remembered(fake_blas, tmp_path, kind, timeout, reason):
    lib = fake_blas(kind)
    done, _ = run_with(lib, tmp_path / "cache", timeout=timeout)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state["path"] != lib and state["source"] != "env"
    line = next(line for line in done.stderr.splitlines() if f"{blas.ENV}={lib} " in line)
    assert reason in line and line.endswith("not used")
    cache = tmp_path / "cache" / "openelm-mlx" / blas.PROBE_CACHE
    cached = json.loads(cache.read_text())
    keys = [k for k in cached if k.startswith(os.path.realpath(lib) + ":")]
    assert len(keys) == 1 and reason in cached[keys[0]]
    cache.write_text(json.dumps({keys[0]: "was refused before"}))
    done, _ = run_with(lib, tmp_path / "cache", timeout=timeout)  # the cached verdict is used: no second probe
    assert done.returncode == 0 and "was refused before; not used" in done.stderr, done.stderr


def test_help_loads_no_blas_even_a_broken_one(fake_blas, tmp_path):
    lib = fake_blas("hang")
    for args in (["--help"], ["generate", "-h"]):
        done, seconds = run_with(lib, tmp_path / "cache", *args, timeout="60")
        assert done.returncode == 0 and "Usage" in done.stdout and seconds < 30, done.stderr
    assert not (tmp_path / "cache" / "openelm-mlx").exists()  # nothing was probed


def test_help_only_reads_only_our_own_command_lines():
    assert blas.help_only(["/usr/bin/openelm-mlx", "generate", "--help"])
    assert blas.help_only(["/usr/bin/openelm-mlx"])  # no arguments: the CLI prints its help
    assert blas.help_only(["-m", "--help"])
    assert not blas.help_only(["/usr/bin/openelm-mlx", "generate", "--prompt", "x"])
    assert not blas.help_only(["/usr/bin/my-script", "--help"])  # someone else's program importing ours
