"""Output modes follow the umask, read without changing it (another thread may be creating files meanwhile)."""

import os

import pytest

from openelm_mlx.folders import fs


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _forbid_umask(monkeypatch):
    def umask(mask):
        raise AssertionError(f"os.umask({mask:#o}) changes the whole process's umask")

    monkeypatch.setattr(os, "umask", umask)


@pytest.mark.parametrize("proc", [True, False], ids=["proc-status", "probe-folder"])
def test_output_modes_follow_the_umask_without_setting_it(umask_027, monkeypatch, tmp_path, proc):
    if proc and not os.path.isfile(fs.PROC_STATUS):
        pytest.skip("no /proc/self/status here")
    if not proc:
        monkeypatch.setattr(fs, "PROC_STATUS", str(tmp_path / "missing"))
    _forbid_umask(monkeypatch)
    assert fs._umask_mode() == 0o750
    fs.write_file_atomic(tmp_path / "r.json", "{}\n")
    with fs.atomic_output_dir(tmp_path / "out", kind="model") as tmp:
        (tmp / "x").write_text("x")
    monkeypatch.undo()
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
