"""A fast BLAS for MLX's CPU backend on Linux, loaded before `mlx.core` (the `mlx[cpu]` wheel links netlib's).

Order: `OPENELM_MLX_BLAS` (a path, or `none`), MKL from the `mkl` extra, a system OpenBLAS/BLIS. Each candidate's
`cblas_sgemm` is called through ctypes and checked against a pure-Python product before it is kept RTLD_GLOBAL.
A library named by `OPENELM_MLX_BLAS` is untrusted: it is first loaded and checked in a child process with a
timeout (a library that crashes or hangs is refused, not fatal), once per path and modification time.
This module imports only the standard library: the child runs it from its file.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("openelm_mlx")
ENV = "OPENELM_MLX_BLAS"
TIMEOUT_ENV = "OPENELM_MLX_BLAS_TIMEOUT"  # seconds the child may take to load and check a library (default 30)
PROBE_CACHE = "blas-probes.json"
HELP_FLAGS = ("-h", "--help", "--version")
HINT = 'for a fast CPU BLAS: pip install "openelm-mlx[mkl]" (x86-64) or apt-get install libopenblas0-pthread'
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@dataclass
class BlasState:
    """What the loader did: `source` is env, mkl, system, bundled (none found), off, late, or platform."""

    source: str = "bundled"
    path: str | None = None
    detail: str = ""

    @property
    def loaded(self) -> bool:
        """A fast BLAS was found, checked and loaded by us (only on Linux)."""
        return self.path is not None

    def describe(self) -> str:
        """One line for `info`, `bench` and `--verbose`."""
        if self.path:
            return f"{Path(self.path).name} ({self.source}: {self.path})"
        return f"MLX's bundled BLAS ({self.detail})" if self.detail else "MLX's bundled BLAS"


STATE = BlasState()


def _triplet() -> str:
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(platform.machine(), "")


def mkl_candidates() -> list[Path]:
    """libmkl_rt.so.* from the `mkl` wheel (installed into the environment's lib folder)."""
    roots = dict.fromkeys([Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"])
    return [p for root in roots for p in sorted(root.glob("libmkl_rt.so*"), reverse=True)]


def system_candidates() -> Iterator[str]:
    """OpenBLAS, then BLIS, at the usual Debian/Ubuntu/Fedora paths, then by `ctypes.util.find_library` (slower)."""
    t = _triplet()
    paths = [
        f"/usr/lib/{t}/openblas-pthread/libopenblas.so.0",
        f"/usr/lib/{t}/openblas-pthread/libblas.so.3",
        f"/usr/lib/{t}/libopenblas.so.0",
        "/usr/lib64/libopenblasp.so.0",
        "/usr/lib64/libopenblas.so.0",
        f"/usr/lib/{t}/blis-pthread/libblas.so.3",
        f"/usr/lib/{t}/libblis.so.4",
        "/usr/lib64/libblis-mt.so.4",
        "/usr/lib64/libblis.so.4",
    ]
    yield from (p for p in paths if os.path.exists(p))
    yield from (f for f in map(ctypes.util.find_library, ("openblas", "openblasp", "blis")) if f)


def _sgemm_agrees(lib: ctypes.CDLL) -> bool:
    """C = A @ B and C = A @ B^T on small float32 matrices, compared with a Python product."""
    sgemm = lib.cblas_sgemm
    ci, cf, fp = ctypes.c_int, ctypes.c_float, ctypes.POINTER(ctypes.c_float)
    sgemm.argtypes = [ci, ci, ci, ci, ci, ci, cf, fp, ci, fp, ci, cf, fp, ci]
    sgemm.restype = None
    M, N, K = 5, 7, 6
    a = [((i * 7 + 3) % 11 - 5) / 4 for i in range(M * K)]
    b = [((i * 5 + 1) % 13 - 6) / 8 for i in range(K * N)]  # (K, N); also read as B^T of shape (N, K)
    for trans in (_NO_TRANS, _TRANS):
        bk = (lambda k, n: b[k * N + n]) if trans == _NO_TRANS else (lambda k, n: b[n * K + k])
        want = [sum(a[m * K + k] * bk(k, n) for k in range(K)) for m in range(M) for n in range(N)]
        c = (cf * (M * N))()
        ldb = N if trans == _NO_TRANS else K
        sgemm(_ROW_MAJOR, _NO_TRANS, trans, M, N, K, 1.0, (cf * len(a))(*a), K, (cf * len(b))(*b), ldb, 0.0, c, N)
        if any(abs(x - y) > 1e-4 * (1 + abs(y)) for x, y in zip(c, want)):
            return False
    return True


def check_library(path: str | Path) -> str | None:
    """Load `path` RTLD_LOCAL and check its cblas_sgemm; None when it gives right answers, else why not."""
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    except OSError as e:
        return f"cannot be loaded ({str(e).split(': ')[-1]})"
    if not hasattr(lib, "cblas_sgemm"):
        return "has no cblas_sgemm (not a CBLAS library)"
    if not _sgemm_agrees(lib):
        return "gives wrong cblas_sgemm results"
    return None


def try_library(path: str | Path) -> str | None:
    """Load `path` RTLD_GLOBAL if its cblas_sgemm gives right answers; None on success, else why not."""
    why = check_library(path)
    if why is None:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)  # promote the same handle into the global symbol scope
    return why


def cache_dir() -> Path:
    """The user's cache folder for openelm-mlx (XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openelm-mlx"


def _probe_key(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # check_library says why
    return f"{os.path.realpath(path)}:{st.st_mtime_ns}:{st.st_size}"


def _read_probes() -> dict[str, str]:
    try:
        data = json.loads((cache_dir() / PROBE_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}
    )


def _write_probe(key: str, verdict: str) -> None:
    """Record a verdict atomically (temporary file + rename); an unwritable cache only costs a probe next time."""
    with contextlib.suppress(OSError):
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{PROBE_CACHE}.tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({**_read_probes(), key: verdict}, f, indent=1)
            os.replace(tmp, folder / PROBE_CACHE)
        except OSError:
            os.unlink(tmp)
            raise


def _timeout() -> float:
    try:
        value = float(os.environ.get(TIMEOUT_ENV, "30"))
    except ValueError:
        return 30.0
    return value if 0 < value < 1e6 else 30.0


def probe_library(path: str) -> str | None:
    """`check_library(path)` in a child process with a timeout, so a library that crashes or hangs cannot take
    this process down; the verdict is cached per path, modification time and size. None when it is fine."""
    key = _probe_key(path)
    if key is None:
        return check_library(path)
    verdict = _read_probes().get(key)
    if verdict is None:
        verdict = _run_probe(path, _timeout())
        _write_probe(key, verdict)
    return None if verdict == "ok" else verdict


def _run_probe(path: str, timeout: float) -> str:
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('_blas_probe', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); sys.modules['_blas_probe'] = m; spec.loader.exec_module(m); "
        "print('\\n' + (m.check_library(sys.argv[2]) or 'ok'), flush=True)"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", code, __file__, path], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"did not load and run one small cblas_sgemm within {timeout:g} s (hangs?)"
    except OSError as e:
        return f"could not be checked ({e})"
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name if -done.returncode in signal.valid_signals() else "a signal"
        return f"crashes when loaded or called ({name})"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return f"failed its check (exit code {done.returncode})"
    return lines[-1]


def help_only(argv: list[str]) -> bool:
    """The command line only asks the CLI for help or its version (no BLAS is needed, none is loaded)."""
    if not argv:
        return False
    entry = Path(argv[0])
    ours = argv[0] == "-m" or entry.name == "openelm-mlx" or entry.parent.name == "openelm_mlx"
    return ours and (len(argv) == 1 or any(a in HELP_FLAGS for a in argv[1:]))


def _keep(source: str, path: Path | str) -> bool:
    why = probe_library(str(path)) if source == "env" else None
    why = why or try_library(path)
    if why is None:
        STATE.source, STATE.path, STATE.detail = source, str(path), ""
        log.info("openelm-mlx: BLAS %s", STATE.describe())
        return True
    if source == "env":
        log.warning("openelm-mlx: %s=%s %s; not used", ENV, path, why)
    else:
        log.debug("openelm-mlx: skipping %s: %s", path, why)
    return False


def setup() -> BlasState:
    """Pick and load a BLAS once per process; safe to call again (later calls return the first result)."""
    if getattr(setup, "done", False):
        return STATE
    setup.done = True  # type: ignore[attr-defined]
    choice = os.environ.get(ENV, "").strip()
    if sys.platform != "linux":
        STATE.source, STATE.detail = "platform", f"{sys.platform}: MLX's own BLAS (Accelerate on macOS)"
    elif "mlx.core" in sys.modules:
        STATE.source, STATE.detail = "late", "mlx.core was imported before openelm_mlx, too late to load a fast BLAS"
        log.info("openelm-mlx: %s", STATE.detail)
    elif choice.lower() in ("none", "off", "0", "bundled"):
        STATE.source, STATE.detail = "off", f"{ENV}={choice}"
    elif choice and _keep("env", choice):
        pass
    elif not any(_keep("mkl", p) for p in mkl_candidates()) and not any(
        _keep("system", p) for p in system_candidates()
    ):
        STATE.detail = "slow reference BLAS; " + HINT
        log.info("openelm-mlx: no fast BLAS found; %s", HINT)
    return STATE
