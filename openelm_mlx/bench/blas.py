"""A fast BLAS for MLX's CPU backend on Linux, loaded before `mlx.core` (the `mlx[cpu]` wheel links netlib's).

Order: `OPENELM_MLX_BLAS` (a path, or `none`), MKL from the `mkl` extra, a system OpenBLAS/BLIS. Each candidate's
`cblas_sgemm` is called through ctypes and checked against a pure-Python product before it is kept RTLD_GLOBAL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("openelm_mlx")
ENV = "OPENELM_MLX_BLAS"
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


def try_library(path: str | Path) -> str | None:
    """Load `path` RTLD_GLOBAL if its cblas_sgemm gives right answers; None on success, else why not."""
    path = str(path)
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    except OSError as e:
        return f"cannot be loaded ({str(e).split(': ')[-1]})"
    if not hasattr(lib, "cblas_sgemm"):
        return "has no cblas_sgemm (not a CBLAS library)"
    if not _sgemm_agrees(lib):
        return "gives wrong cblas_sgemm results"
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # promote the same handle into the global symbol scope
    return None


def _keep(source: str, path: Path | str) -> bool:
    why = try_library(path)
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
