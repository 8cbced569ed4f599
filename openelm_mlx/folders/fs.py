"""Output folders that appear whole or not at all, and never lose what the user keeps in them.

A folder we write records the files it wrote in `OWNED_FILE`. Updating it builds the new folder
beside it, swaps the two with renames, then carries over every entry we did not write. A run
killed at any point is repaired (or its temporaries removed) the next time the same folder is written.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import CheckpointError, OptionError

OWNED_FILE = ".openelm-mlx-files.json"
WEIGHT_PATTERN = "model*.safetensors"  # what loaders read as weights, so no stranger may stay beside ours
WEIGHT_KINDS = ("model", "hf-model")
log = logging.getLogger("openelm_mlx")


def require_regular_file(path: Path) -> Path:
    """`path` if it is a regular file (symlinks followed); raise CheckpointError for FIFOs, devices, folders."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror.lower() if e.strerror else 'cannot be read'}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise CheckpointError(f"{path}: {kind} (expected a file)")
    return path


def read_record(folder: Path) -> tuple[set[str], str] | None:
    """(names of the entries openelm-mlx wrote into `folder`, what it wrote: "model", "adapters", ...),
    or None when the folder keeps no (readable) record."""
    record = folder / OWNED_FILE
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
        names, kind = data["files"], data.get("kind", "model")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    valid = isinstance(names, list) and isinstance(kind, str)
    if not valid or not all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..") for n in names):
        return None
    return set(names), kind


def owned_files(folder: Path) -> set[str] | None:
    """Names of the entries openelm-mlx wrote into `folder`, or None when it keeps no record."""
    record = read_record(folder)
    return None if record is None else record[0]


def _siblings(dest: Path, kind: str) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}.{kind}-*"))


def recover(dest: Path) -> None:
    """Finish or undo an update of `dest` that a killed process left halfway; remove its temporaries."""
    for old in _siblings(dest, "old"):
        if not dest.exists():
            os.rename(old, dest)  # killed between the two renames: the previous output comes back whole
            log.warning("%s: restored the previous output from an interrupted update", dest)
            continue
        _carry_over(old, dest)
        shutil.rmtree(old, ignore_errors=True)
        log.warning("%s: finished an interrupted update", dest)
    stale = _siblings(dest, "tmp")
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)
    if stale:
        log.warning("%s: removed %d temporary folder(s) left by an interrupted run", dest, len(stale))


def _carry_over(old: Path, new: Path) -> None:
    """Move every entry of `old` that openelm-mlx did not write (and `new` lacks) into `new`."""
    ours = owned_files(old) or set()
    for entry in old.iterdir():
        if entry.name not in ours and entry.name != OWNED_FILE and not (new / entry.name).exists():
            os.rename(entry, new / entry.name)


def output_path(dest: str | Path) -> Path:
    """The absolute folder to write: through a symlink to its target (the link stays a link).

    Raises:
        OptionError: the path is empty.
    """
    if not str(dest).strip():
        raise OptionError("output", "is an empty path")
    dest = Path(dest).absolute()
    return dest.resolve() if dest.is_symlink() else dest


def check_output_file(
    path: str | Path,
    force: bool = False,
    inputs: Sequence[str | Path] = (),
    inputs_are: str = "input files",
    what: str = "output",
    option: str = "output",
) -> Path:
    """Refuse, before any work is done, an output file that would lose something: one of the `inputs`, an
    existing entry that is not a regular file, or an existing file unless `force`. Returns the path.

    Raises:
        OptionError: `option` (the one naming the file) or `force`, naming the file.
    """
    path = Path(path)
    if not str(path).strip():
        raise OptionError(option, "is an empty path")
    if not path.exists() and not path.is_symlink():
        return path
    if any(path.exists() and os.path.samefile(path, f) for f in inputs):
        raise OptionError(option, f"{path} is one of the {inputs_are}; write the {what} elsewhere")
    if not path.is_file() or path.is_symlink():
        raise OptionError(option, f"{path} exists and is not a regular file")
    if not force:
        raise OptionError("force", f"is needed to replace the existing file {path}")
    return path


def write_file_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename: the old file or the new, never half."""
    with atomic_output_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_output_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode() & 0o666)  # mkstemp makes 0600; files follow the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_output(
    dest: str | Path,
    force: bool = False,
    kind: str = "model",
    inputs: Sequence[str | Path] = (),
    writes: Sequence[str] = (),
) -> None:
    """Refuse, before any work is done, an output folder that would lose something.

    Refused: `dest` is one of the `inputs` (or a file); it holds a different kind of openelm-mlx output
    (a model where adapters would go, ...); it is someone else's non-empty folder and not `force`; it
    holds an entry of someone else's named like one the output `writes`; or, for models, it holds a
    stranger's `model*.safetensors` that loaders would read beside ours.

    Raises:
        CheckpointError / OptionError (`force`): naming the folder.
    """
    dest = output_path(dest)
    for given in inputs:
        if Path(given).exists() and dest.exists() and os.path.samefile(given, dest):
            raise CheckpointError(f"{dest}: is also an input ({given}); write the output to another folder")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise CheckpointError(f"{dest}: exists and is not a folder")
    record, entries = read_record(dest), {e.name for e in dest.iterdir()}
    if record is not None and record[1] != kind:
        raise CheckpointError(
            f"{dest}: holds {record[1]} written by openelm-mlx; writing {kind} there would replace it: "
            "choose another folder"
        )
    if record is None and entries - {OWNED_FILE} and not force:
        raise OptionError(
            "force",
            f"is needed to write into {dest}: the folder exists and was not written by openelm-mlx (or choose a new "
            "folder; with force only files openelm-mlx writes are replaced, nothing else in the folder is touched)",
        )
    theirs = entries - (record[0] if record else set())
    strangers = sorted(theirs & set(writes))
    strangers += sorted(n for n in theirs - set(writes) if fnmatch.fnmatch(n, WEIGHT_PATTERN) and kind in WEIGHT_KINDS)
    if strangers:
        raise CheckpointError(
            f"{dest}: holds {', '.join(strangers)}, which openelm-mlx did not write and would replace or read "
            "beside its output; move it away or choose another folder"
        )


def _check_names(dest: Path, new: Path) -> None:
    """Even with force, never replace an entry we did not write (unless it is byte-identical)."""
    if not dest.is_dir():
        return
    theirs = {e.name for e in dest.iterdir()} - (owned_files(dest) or set())
    clash = sorted(n for n in theirs & {f.name for f in new.iterdir()} if not _same_file(dest / n, new / n))
    if clash:
        raise CheckpointError(
            f"{dest}: holds {', '.join(clash)}, which openelm-mlx did not write; move it away or choose another folder"
        )


def _same_file(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    """True when both are regular files with the same bytes (replacing one by the other loses nothing)."""
    if not (a.is_file() and b.is_file()) or a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while block := fa.read(chunk):
            if block != fb.read(chunk):
                return False
    return True


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def atomic_output_dir(
    dest: str | Path, force: bool = False, kind: str = "model", inputs: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success it becomes `dest`.

    A new `dest` appears whole with one rename. An existing `dest` must be an earlier output of ours of
    the same `kind` (or `force`, see `check_output`); the new folder replaces it by renames, and every
    entry of the old folder that we did not write is moved into the new one. On error nothing in `dest`
    changes.

    Raises:
        CheckpointError: see `check_output`; or `dest` holds an entry of someone else's where ours would go.
        OptionError: `dest` is a folder of someone else's and `force` is not set.
    """
    dest = output_path(dest)
    check_output(dest, force, kind, inputs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, _umask_mode())  # mkdtemp makes 0700; outputs follow the umask like any folder
    try:
        yield tmp
        check_output(dest, force, kind, inputs)  # again: the folder may have changed meanwhile
        _check_names(dest, tmp)
        names = sorted(f.name for f in tmp.iterdir())
        (tmp / OWNED_FILE).write_text(json.dumps({"kind": kind, "files": names}, indent=1))
        if not dest.exists():
            os.rename(tmp, dest)
            return
        os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode))  # the folder keeps its permissions
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rmdir(old)
        os.rename(dest, old)
        os.rename(tmp, dest)
        _carry_over(old, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
