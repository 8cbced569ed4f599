"""Output folders that appear whole or not at all, and never lose what the user keeps in them.

A folder we write records the files it wrote in `OWNED_FILE`. Updating it builds the new folder
beside it, swaps the two with renames, then carries over every entry we did not write. A run
killed at any point is repaired (or its temporaries removed) the next time the same folder is written.
One process writes a folder at a time (a `.NAME.lock` file beside it, flock'ed); temporaries carry their
owner's process id and are removed only once it has gone. A full disk or a file-size limit is one WriteError.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import CheckpointError, OpenELMError, OptionError

OWNED_FILE = ".openelm-mlx-files.json"
WEIGHT_PATTERN = "model*.safetensors"  # what loaders read as weights, so no stranger may stay beside ours
WEIGHT_KINDS = ("model", "hf-model")
log = logging.getLogger("openelm_mlx")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


class WriteError(OpenELMError):
    """An output could not be written (a full disk, a file-size limit); the message names the folder and why."""


def write_failure(e: BaseException, where: Path) -> str | None:
    """Why writing into `where` failed, when `e` is a failed write (a full disk, a file-size limit, ...); else None.

    MLX reports its failed writes as RuntimeError("[write] Unable to write N bytes ...") without the reason,
    so the reason is found from the file-size limit and the free space.
    """
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        reason = os.strerror(e.errno).lower()
    elif isinstance(e, RuntimeError) and str(e).startswith(("[write]", "[save_safetensors]", "[save]")):
        reason = " ".join(str(e).split())
    else:
        return None
    import resource  # POSIX only, like the rest of this module's renames

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and (not isinstance(e, OSError) or e.errno == errno.EFBIG):
        return f"the file-size limit (ulimit -f) of {limit} bytes was reached"
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(where if where.exists() else where.parent).free
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or free < 64 << 20:
            return f"no space left on the device ({free / 1e6:.1f} MB free)"
    return reason


@contextlib.contextmanager
def named_write_errors(dest: Path, what: str = "the output") -> Iterator[None]:
    """Turn a failed write (see `write_failure`) into one WriteError naming `dest` and the cause."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, OpenELMError) or (reason := write_failure(e, dest)) is None:
            raise
        raise WriteError(f"{dest}: could not write {what}: {reason}; nothing was changed") from None


def entry_problem(path: Path) -> str | None:
    """None when `path` is a regular file (symlinks followed); else what it is instead, e.g. "a FIFO"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a symbolic link to nothing" if os.path.lexists(path) else "no such file"
    except OSError as e:
        return (e.strerror or "cannot be read").lower()
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    return f"not a regular file ({kind})"


def require_regular_file(path: Path) -> Path:
    """`path` if it is a regular file (symlinks followed); raise CheckpointError for FIFOs, devices, folders."""
    problem = entry_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
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
    """Temporaries of `dest` (`.NAME.tmp-PID-...`) whose owner is dead: never one of a live process's."""
    return sorted(p for p in dest.parent.glob(f".{dest.name}.{kind}-*") if not _owner_alive(p.name))


def _temporary_prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{os.getpid()}-"


def _owner_alive(name: str) -> bool:
    """The process whose id a temporary's name records (`...tmp-PID-xxxx`) still runs (pre-pid names: no owner)."""
    pid = name.rpartition(".")[2].split("-")[1:2]
    if not pid or not pid[0].isdigit():
        return False
    try:
        os.kill(int(pid[0]), 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


_HELD: dict[Path, list[int]] = {}  # lock file -> [fd, depth]: locks this process holds (re-entrant)
_HELD_GUARD = threading.Lock()


def _lock_file(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.lock"


def claim_folder(dest: str | Path) -> None:
    """Hold the lock of the output folder `dest` (a `.NAME.lock` file beside it, flock'ed) until `release_folder`.

    Re-entrant within this process; another process holding it makes this raise at once.

    Raises:
        CheckpointError: another process is writing `dest` now.
    """
    dest = output_path(dest)
    lock = _lock_file(dest)
    with _HELD_GUARD:
        if lock in _HELD:
            _HELD[lock][1] += 1
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise CheckpointError(
                    f"{dest}: another openelm-mlx run (process {owner}) is writing this folder now; wait for it to "
                    "finish or choose another folder"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break  # still the file at that path (not one a releasing owner just removed)
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[lock] = [fd, 1]


def release_folder(dest: str | Path) -> None:
    """Release what `claim_folder(dest)` took (the last release removes the lock file); a no-op when not held."""
    lock = _lock_file(output_path(dest))
    with _HELD_GUARD:
        if lock not in _HELD:
            return
        _HELD[lock][1] -= 1
        if _HELD[lock][1] > 0:
            return
        fd = _HELD.pop(lock)[0]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still locked: a waiting process then finds it gone and opens a fresh one
        os.close(fd)


@contextlib.contextmanager
def folder_lock(dest: str | Path) -> Iterator[None]:
    """`claim_folder` for the duration of a `with` block."""
    claim_folder(dest)
    try:
        yield
    finally:
        release_folder(dest)


def remove_stale(folder: Path, pattern: str) -> int:
    """Remove the entries of `folder` matching `pattern` whose owning process is dead; return how many."""
    stale = [p for p in folder.glob(pattern) if not _owner_alive(p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


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
    """Refuse, before any work is done, an output file that would lose something: one of the `inputs` or a
    path inside an input folder (with or without `force`), an existing entry that is not a regular file, or
    an existing file unless `force`. Returns the path.

    Raises:
        OptionError: `option` (the one naming the file) or `force`, naming the file.
    """
    path = Path(path)
    if not str(path).strip():
        raise OptionError(option, "is an empty path")
    for given in inputs:
        if _inside(path, Path(given)):
            raise OptionError(option, f"{path} is inside {given}, one of the {inputs_are}; write the {what} elsewhere")
    _check_parent(path, option)
    if not path.exists() and not path.is_symlink():
        return path
    if any(path.exists() and Path(f).exists() and os.path.samefile(path, f) for f in inputs):
        raise OptionError(option, f"{path} is one of the {inputs_are}; write the {what} elsewhere")
    if not path.is_file() or path.is_symlink():
        raise OptionError(option, f"{path} exists and is not a regular file")
    if not force:
        raise OptionError("force", f"is needed to replace the existing file {path}")
    return path


def _check_parent(path: Path, option: str) -> None:
    """The folder `path` goes in can take a new file: its nearest existing ancestor is a folder, and the folder
    itself (when it exists) lets a file be made in it (tried: access rights do not tell on read-only mounts).
    A missing folder is made when the file is written."""
    # the nearest existing ancestor (a dangling link counts: the write would fail on it)
    folder = next(p for p in path.absolute().parents if p.exists() or p.is_symlink() or p == p.parent)
    if not folder.is_dir():
        raise OptionError(option, f"{path}: {folder} is not a folder")
    try:  # in the folder itself, or in the ancestor the missing folders would be made in
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.probe-")
    except OSError as e:
        raise OptionError(option, f"{path}: cannot make a file in {folder} ({e.strerror or e})") from None
    try:
        os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _inside(path: Path, folder: Path) -> bool:
    """`path` (followed through links) lies inside the existing folder `folder`."""
    if not folder.is_dir():
        return False
    target = path.resolve()
    return any(p.exists() and os.path.samefile(p, folder) for p in target.parents)


def write_file_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename: the old file or the new, never half."""
    with atomic_output_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_output_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    except OSError as e:  # named by the user's path, not the temporary one
        raise WriteError(f"{path}: could not write the file: {e.strerror or e}; nothing was changed") from None
    os.close(fd)
    try:
        with named_write_errors(path, "the file"):
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


PROC_STATUS = "/proc/self/status"  # holds the process umask on Linux >= 4.7


def _umask_mode() -> int:
    """0o777 less the process umask, read without setting it (`os.umask` can only be read by changing it,
    which races with other threads): Linux reports it in /proc/self/status; elsewhere a folder made with
    mode 0o777 shows what the umask leaves."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(PROC_STATUS).read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o777 & ~int(line.split()[1], 8)
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe")
        os.mkdir(probe, 0o777)
        return stat.S_IMODE(os.stat(probe).st_mode)


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
    with folder_lock(dest):
        recover(dest)
        yield from _write_output(dest, force, kind, inputs)


def _write_output(dest: Path, force: bool, kind: str, inputs: Sequence[str | Path]) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(dest, "tmp"), dir=dest.parent))
    os.chmod(tmp, _umask_mode())  # mkdtemp makes 0700; outputs follow the umask like any folder
    try:
        with named_write_errors(dest):
            yield tmp
            check_output(dest, force, kind, inputs)  # again: the folder may have changed meanwhile
            _check_names(dest, tmp)
            names = sorted(f.name for f in tmp.iterdir())
            (tmp / OWNED_FILE).write_text(json.dumps({"kind": kind, "files": names}, indent=1))
        if not dest.exists():
            os.rename(tmp, dest)
            return
        os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode))  # the folder keeps its permissions
        old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(dest, "old"), dir=dest.parent))
        os.rmdir(old)
        os.rename(dest, old)
        os.rename(tmp, dest)
        _carry_over(old, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
