"""Hostile torch zip checkpoints, built byte by byte: every one must fail as one ValueError naming
the file (and the tensor, storage or entry), never read out of bounds, allocate hugely, hang, or crash."""

from __future__ import annotations

import json
import os
import pickletools
import random
import struct
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from checkpoints import _str, _tuple, write_malicious_zip, write_torch_zip
from openelm_mlx.convert.torch_zip import load_torch_zip
from typer.testing import CliRunner

from openelm_mlx.cli import app
from openelm_mlx.model.config import OpenELMConfig


def _p(v: object) -> bytes:
    """Pickle opcodes (protocol 2) for the plain values a torch pickle holds."""
    if v is None:
        return b"N"
    if isinstance(v, bool):
        return b"\x88" if v else b"\x89"
    if isinstance(v, int):
        if -(2**31) <= v < 2**31:
            return b"J" + struct.pack("<i", v)
        raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw  # LONG1
    if isinstance(v, float):
        return b"G" + struct.pack(">d", v)
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, bytes):
        return v  # raw opcodes
    return _tuple([_p(x) for x in v])


def _tensor(offset=0, shape=(1,), stride=(1,), key="0", numel=1, storage="FloatStorage", pid=None) -> bytes:
    pid = pid if pid is not None else _p(("storage", b"ctorch\n" + storage.encode() + b"\n", key, "cpu", numel))
    args = [pid + b"Q", _p(offset), _p(shape), _p(stride), b"\x89", b"ccollections\nOrderedDict\n)R"]
    return b"ctorch._utils\n_rebuild_tensor_v2\n" + _tuple(args) + b"R"


def _zip(path: Path, body: bytes, storages: dict | None = None, compress=zipfile.ZIP_STORED, order="little") -> Path:
    """A torch zip around hand-written pickle `body` (protocol header and STOP added)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02" + body + b".")
        zf.writestr("archive/byteorder", order)
        for key, data in (storages if storages is not None else {"0": b"\0" * 4}).items():
            zf.writestr(f"archive/data/{key}", data, compress_type=compress)
    return path


def _state(tensor: bytes, key: bytes = _str("w")) -> bytes:
    return b"}(" + key + tensor + b"u"


def _load_all(path: Path) -> dict:
    """Load the checkpoint and every tensor in it (the reads are lazy)."""
    obj = load_torch_zip(path)
    return {k: v.load() for k, v in obj.items() if hasattr(v, "load")}


# 1. views and storages: every size, stride and offset is checked against the storage's real length
@pytest.mark.parametrize(
    "kwargs, storage, message",
    [
        (dict(shape=(2048, 192), stride=(192, 1)), b"\0" * 4, r"tensor 'w': view .* runs past its storage 0 of 1"),
        (dict(offset=-1), b"\0" * 4, r"tensor 'w': storage offset -1 is not a non-negative int"),
        (dict(offset=1), b"\0" * 4, r"tensor 'w': view \(offset 1.*runs past its storage"),
        (dict(offset=5, shape=(0,)), b"\0" * 4, r"tensor 'w': view \(offset 5.*runs past its storage"),
        (dict(shape=(2,), stride=(-1,), numel=2), b"\0" * 8, r"tensor 'w': stride \(-1,\) is not a tuple of non-neg"),
        (dict(shape=(2, 2), stride=(1,), numel=4), b"\0" * 16, r"tensor 'w': stride \(1,\) does not match shape"),
        (dict(shape=("2",)), b"\0" * 4, r"tensor 'w': shape \('2',\) is not a tuple of non-negative ints"),
        (dict(shape=(True,)), b"\0" * 4, r"tensor 'w': shape \(True,\) is not a tuple"),
        (dict(shape=(1.0,)), b"\0" * 4, r"tensor 'w': shape \(1.0,\) is not a tuple"),
        (dict(shape=(1,) * 40, stride=(1,) * 40), b"\0" * 4, r"tensor 'w': shape .* is not a tuple"),
        (dict(offset="0"), b"\0" * 4, r"tensor 'w': storage offset '0' is not a non-negative int"),
        (dict(shape=(4,), stride=(0,)), b"\0" * 4, r"tensor 'w': view .* runs past its storage"),  # 4 from 1
        (dict(shape=(2**40,), stride=(0,)), b"\0" * 4, r"tensor 'w': view .* runs past its storage"),
        (dict(shape=(2,), numel=2), b"\0" * 4, r"entry archive/data/0 holds 4 bytes, but its storage declares 8"),
        (dict(), b"\0" * 8, r"entry archive/data/0 holds 8 bytes, but its storage declares 4"),
        (dict(key="1"), b"\0" * 4, r"tensor 'w': storage archive/data/1 is missing"),
    ],
)
def test_views_are_checked_against_their_storage(tmp_path, kwargs, storage, message):
    path = _zip(tmp_path / "model.bin", _state(_tensor(**kwargs)), {"0": storage})
    with pytest.raises(ValueError, match=f"^{tmp_path / 'model.bin'}: {message}"):
        _load_all(path)


@pytest.mark.parametrize("order", ["little", "big"])
def test_valid_views_read_exactly_their_elements(tmp_path, order):
    data = np.arange(12, dtype=np.float32)
    cases = {
        "whole": (0, (3, 4), (4, 1)),
        "t": (0, (4, 3), (1, 4)),
        "tail": (10, (2,), (1,)),
        "scalar": (5, (), ()),
        "bcast": (0, (3, 2), (1, 0)),  # stride 0, no more elements than the storage holds
        "empty": (12, (0, 5), (5, 1)),
    }
    body = b"}(" + b"".join(_str(k) + _tensor(o, s, st, numel=12) for k, (o, s, st) in cases.items()) + b"u"
    raw = data.astype(">f4" if order == "big" else "<f4").tobytes()
    got = _load_all(_zip(tmp_path / "ok.bin", body, {"0": raw}, order=order))
    for k, (o, s, st) in cases.items():
        want = np.lib.stride_tricks.as_strided(data[o:], s, tuple(4 * x for x in st)) if k != "empty" else np.zeros(s)
        assert got[k].shape == s and got[k].dtype == np.float32 and np.array_equal(got[k], want), k


def test_bool_storages_hold_only_0_or_1(tmp_path):
    body = _state(_tensor(shape=(3,), numel=3, storage="BoolStorage"))
    got = _load_all(_zip(tmp_path / "b.bin", body, {"0": b"\0\x01\xff"}))["w"]
    assert got.dtype == np.bool_ and got.view(np.uint8).tolist() == [0, 1, 1]


# 2. resource exhaustion: memo indices, nesting, sharing, zip bombs
def _deep_list(n: int) -> bytes:
    """n nested lists built through the memo, so no MARK and no growing stack shows the depth."""
    ops = b"]q\x000"
    for i in range(1, n):
        ops += b"h" + bytes([(i - 1) % 256]) if i - 1 < 256 else b"j" + struct.pack("<I", i - 1)
        ops += b"]" + (b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)) + b"a0"
    return ops + b"h\x00"


@pytest.mark.parametrize(
    "body, message",
    [
        (b"}r\x00\x00\x00\x80", r"data.pkl: memo index 2147483648"),  # LONG_BINPUT 2**31: a 16 GB memo
        (b"}r\xff\xff\xff\x7f", r"data.pkl: memo index 2147483647"),
        (b"}j\x00\x00\x00\x80", r"cannot read data.pkl \(KeyError"),  # LONG_BINGET of nothing
        (b"}" + _str("x") + b")" + b"\x85" * 100_000 + b"s", r"data.pkl nests deeper than 200"),
        (b"}" + b")" + b"\x85" * 100_000 + b"Ns", r"data.pkl: a key at byte \d+ is not a str"),  # segfaulted
        (b"}" + _str("x") + b"(" * 1000 + b"]" + b"l" * 1000 + b"s", r"data.pkl nests deeper than 200"),
        (b"}" + _str("x") + _deep_list(5000) + b"s", r"data.pkl nests deeper than 200"),
        (b"]q\x00h\x00a", r"data.pkl nests deeper than 200 levels at .\[0\]\[0\]"),  # a cycle
        (b"a", r"cannot read data.pkl \(IndexError: stack underflow"),
        (b"\xff", r"cannot read data.pkl \(ValueError"),  # not an opcode
        (b"X\xff\xff\xff\x7f", r"cannot read data.pkl"),  # a 2 GB string in 10 bytes
        # hash flooding: keys whose hashes an attacker can make collide (quadratic inserts)
        (b"}" + _p((1, 2)) + b"Ns", r"data.pkl: a key at byte \d+ is not a str or small int"),
        (b"}(" + _p(2**61 - 1) + b"N" + _p(2 * (2**61 - 1)) + b"Nu", r"data.pkl: a key at byte \d+ is not a str"),
        (b"cbuiltins\nset\n]" + _p((1, 2)) + b"a\x85R", r"data.pkl: refusing set\(\) of \[<tuple>\]"),
        (b"ccollections\nOrderedDict\n]" + _p(("a", 1)) + b"a\x85R", r"data.pkl: refusing OrderedDict\(\)"),
        # one list copied again and again through the memo: quadratic memory from a linear pickle
        (
            b"]q\x00(" + b"K\x01" * 1000 + b"ectorch\nSize\nq\x01" + b"h\x01h\x00\x85R0" * 2000 + b"}",
            r"data.pkl: refusing tuple\(\) of <list>",
        ),
    ],
)
def test_pickles_that_would_exhaust_memory_or_stack_are_refused(tmp_path, body, message):
    with pytest.raises(ValueError, match=f"^{tmp_path / 'a.bin'}: {message}"):
        load_torch_zip(_zip(tmp_path / "a.bin", body))


def _shared(levels: int) -> bytes:
    """Opcodes for a list holding the previous list twice, `levels` deep: 2**levels paths, one of
    each list (memo slots 0 to levels - 1)."""
    ops = b"]q\x000"
    for i in range(1, levels):
        ops += b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i]) + b"0"
    return ops + b"h" + bytes([levels - 1])


def test_messages_never_repr_a_whole_value(tmp_path):
    """2**24 paths as an offset, a 16 kB key at every one of 150 levels: the message is short, and fast."""
    bomb = _shared(24)
    nested = _str("k" * (1 << 14)) + b"q\x000}" + b"h\x00}" * 149 + _str("w") + _tensor(offset=9) + b"s" * 150
    for body, message in [
        (_state(_tensor(offset=bomb)), r"tensor 'w': storage offset \[<list>, <list>\] is not a non-negative int"),
        (nested, r"tensor 'kkkk[k]{56}\.kkk[k.]{100,}': view \(offset 9"),
        (_state(_tensor(key="9" * 65)), r"storage key '9999999999[9]{30}' is too long"),
    ]:
        tic = time.perf_counter()
        with pytest.raises(ValueError, match=f"^{tmp_path / 's.bin'}: {message}") as e:
            _load_all(_zip(tmp_path / "s.bin", body))
        assert time.perf_counter() - tic < 2 and len(str(e.value)) < 500


def test_shared_containers_are_converted_once(tmp_path):
    """2**22 paths through 22 shared lists: converted once each, in linear time, sharing kept."""
    body = b"}(" + _str("w") + _tensor() + _str("x") + _shared(22) + b"u"
    tic = time.perf_counter()
    obj = load_torch_zip(_zip(tmp_path / "dag.bin", body))
    assert time.perf_counter() - tic < 2 and obj["x"][0] is obj["x"][1]


def test_zip_bombs_are_refused_before_inflating(tmp_path):
    bomb = _zip(tmp_path / "bomb.bin", _state(_tensor()), {"0": b"\0" * (64 << 20)}, zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ValueError, match=rf"^{bomb}: entry archive/data/0 declares 67108864 bytes from \d+ \(zip bomb"):
        load_torch_zip(bomb)
    pkl_bomb = tmp_path / "pkl_bomb.bin"
    with zipfile.ZipFile(pkl_bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}" + b"\0" * (64 << 20) + b".")
    with pytest.raises(ValueError, match=rf"^{pkl_bomb}: entry archive/data.pkl declares \d+ bytes from"):
        load_torch_zip(pkl_bomb)
    big_pickle = _zip(tmp_path / "big_pickle.bin", b"}" + b"N0" * (3 << 20))  # stored: no bomb, just big
    with pytest.raises(ValueError, match=rf"^{big_pickle}: entry archive/data.pkl is 6291460 bytes, more than 4194304"):
        load_torch_zip(big_pickle)


def test_a_small_view_of_a_large_storage_reads_only_what_it_needs(tmp_path):
    data = np.arange(1 << 22, dtype=np.float32)  # 16 MiB
    body = _state(_tensor(offset=7, shape=(2,), stride=(1,), numel=data.size))
    tensor = load_torch_zip(_zip(tmp_path / "big.bin", body, {"0": data.tobytes()}))["w"]
    tracemalloc.start()
    try:
        assert tensor.load().tolist() == [7.0, 8.0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def _set_field(path: Path, local: int, central: int | None, value: bytes, name: bytes = b"archive/data/0") -> None:
    """Overwrite a field (at these offsets) of entry `name`'s local header and central directory record."""
    raw = bytearray(path.read_bytes())
    for sig, name_at, off in ((b"PK\x03\x04", 30, local), (b"PK\x01\x02", 46, central)):
        i = raw.find(sig)
        while i >= 0:
            if off is not None and raw[i + name_at : i + name_at + len(name)] == name:
                raw[i + off : i + off + len(value)] = value
            i = raw.find(sig, i + 4)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "local, central, value, message",
    [
        (8, 10, b"\x63\x00", r"entry archive/data/0 uses unsupported compression method 99"),
        (6, 8, b"\x01\x00", r"entry archive/data/0 is encrypted"),
        (14, 16, b"\0\0\0\0", r"cannot read archive/data/0 \(BadZipFile: Bad CRC-32"),
        (18, 20, b"\xff\xff\xff\x0f", r"entry archive/data/0 runs past the end of the file"),
        (22, 24, b"\xff\xff\xff\x0f", r"entry archive/data/0 declares 268435455 bytes from 16384"),
        (30, None, b"X", r"cannot read archive/data/0 \(BadZipFile: File name in directory"),
    ],
)
def test_broken_zip_entries_name_the_entry(tmp_path, local, central, value, message):
    path = _zip(tmp_path / "z.bin", _state(_tensor(numel=4096)), {"0": bytes(range(256)) * 64})  # 4 of 16 kB: CRC too
    _set_field(path, local, central, value)
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        _load_all(path)


def test_truncated_or_garbage_zips_fail_cleanly(tmp_path):
    path = _zip(tmp_path / "t.bin", _state(_tensor()))
    raw = path.read_bytes()
    for cut in (len(raw) // 2, 22, 0):
        path.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=f"^{path}: not a torch zip checkpoint"):
            load_torch_zip(path)


def _fuzz(bad: Path, data: bytes) -> None:
    """Load `data` as a checkpoint and read its tensors: fine, or one ValueError naming the file."""
    bad.write_bytes(data)
    try:
        state = load_torch_zip(bad).get("model_state_dict")
        for tensor in state.values() if isinstance(state, dict) else []:
            if hasattr(tensor, "load"):
                tensor.load()
    except ValueError as e:
        assert str(e).startswith(f"{bad}: "), e


def test_mutated_checkpoints_only_ever_raise_value_errors(tmp_path):
    """A seeded fuzz: a CoreNet checkpoint with bytes of the zip overwritten, or opcodes of its
    pickle dropped, repeated or replaced: it loads or raises one ValueError naming the file."""
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    write_torch_zip(good, {"a": np.ones((3, 4), np.float32), "b": np.arange(5.0)}, wrap="model_state_dict")
    raw = good.read_bytes()
    rng = random.Random(0)
    for _ in range(300):
        mutated = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(len(raw))] = rng.randrange(256)
        _fuzz(bad, bytes(mutated))
    with zipfile.ZipFile(good) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    pickle_bytes = entries["good/data.pkl"]
    starts = [pos for _, _, pos in pickletools.genops(pickle_bytes)] + [len(pickle_bytes)]
    ops = [pickle_bytes[a:b] for a, b in zip(starts, starts[1:])]
    for _ in range(300):
        mutated = list(ops)
        for _ in range(rng.randint(1, 4)):
            at, kind = rng.randrange(len(ops) - 1), rng.randrange(3)
            if kind == 0:
                mutated.pop(at)
            else:  # another of its opcodes, or a memo fetch
                mutated.insert(at, ops[rng.randrange(len(ops))] if kind == 1 else b"h\x00")
        with zipfile.ZipFile(bad, "w") as zf:
            for name, data in entries.items():
                zf.writestr(name, b"".join(mutated) if name == "good/data.pkl" else data)
        _fuzz(bad, bad.read_bytes())


# 3. only regular files
def _load_in_thread(path: Path) -> BaseException | None:
    """What load_torch_zip raises, or None; a FIFO it blocks on is released after 5 s and the test fails."""
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            load_torch_zip(path)
            box.append(None)
        except BaseException as e:
            box.append(e)

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # blocked in open() of the FIFO, waiting for a writer
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"{path}: load_torch_zip blocked")
    return box[0]


def test_only_regular_files_are_opened(tmp_path):
    (tmp_path / "dir.bin").mkdir()
    os.mkfifo(tmp_path / "fifo.bin")
    os.symlink(tmp_path / "loop.bin", tmp_path / "loop.bin")
    cases = {"dir.bin": "not a regular file", "fifo.bin": "not a regular file", "loop.bin": "cannot open"}
    for name, message in cases.items():
        error = _load_in_thread(tmp_path / name)
        assert isinstance(error, ValueError) and str(error).startswith(f"{tmp_path / name}: {message}"), error
    with pytest.raises(ValueError, match="/dev/null: not a regular file"):
        load_torch_zip("/dev/null")


# 4. pickle-level oddities
_STORAGE = b"ctorch\nFloatStorage\n"
_REBUILD = b"ctorch._utils\n_rebuild_parameter\n"
_PID = _p(("storage", _STORAGE, "0", "cpu", 1))


@pytest.mark.parametrize(
    "body, message",
    [
        (_state(_tensor(pid=_p(("storage", _STORAGE, "0", "cpu")))), r"unsupported persistent id"),
        (_state(_tensor(pid=_p(("storage", _STORAGE, 1.5, "cpu", 1)))), r"unsupported persistent id"),
        (_state(_tensor(pid=_p(("storage", _STORAGE, "0", "cpu", -1)))), r"unsupported persistent id"),
        (_state(_tensor(pid=_p(("storage", _STORAGE, "0", "cpu", True)))), r"unsupported persistent id"),
        (_state(_tensor(pid=_p(("storage", "FloatStorage", "0", "cpu", 1)))), r"unsupported persistent id"),
        (_state(_tensor(numel=10**15)), r"storage '0' claims 1000000000000000 elements"),
        (_state(_tensor(numel=10**500)), r"storage '0' claims <int> elements"),
        (_state(_tensor(pid=_p(("storage", _STORAGE, 2**100, "cpu", 1)))), r"unsupported persistent id"),
        (_state(_tensor(storage="EvilStorage")), r"refusing to load: .* torch.EvilStorage"),
        (
            _state(b"ctorch._utils\n_rebuild_tensor_v2\n" + _p(("x", 0)) + b"R"),
            r"tensor 'w': _rebuild_tensor called without a storage",
        ),
        (_state(_tensor(), key=_p(3)), r"tensor key 3 in 'the top dict' is not a string"),
        (b"]" + _tensor() + b"a", r"expected a dict at the top of data.pkl, found list"),
        (_p(1), r"expected a dict at the top of data.pkl, found int"),
        (b"}(" + _str("m") + _state(_tensor(offset=9)) + b"u", r"tensor 'm.w': view \(offset 9"),
        # BUILD cannot rewrite our objects: not the rebuild functions, not a storage's numel
        (_REBUILD + b"N}" + _str("__defaults__") + b")s\x86b0" + _state(_tensor()), r"cannot read data.pkl"),
        (_PID + b"Q}" + _str("numel") + _p(10**6) + b"sb0" + _state(_tensor()), r"cannot read data.pkl"),
    ],
)
def test_pickle_oddities_are_refused(tmp_path, body, message):
    with pytest.raises(ValueError, match=f"^{tmp_path / 'o.bin'}: {message}"):
        _load_all(_zip(tmp_path / "o.bin", body))
    assert _load_all(_zip(tmp_path / "ok.bin", _state(_tensor())))["w"].tolist() == [0.0]  # nothing was altered


@pytest.mark.parametrize(
    "body",
    [
        b"}(" + _str("w") + _tensor() + _str("x") + b"](eu",  # APPENDS of nothing
        b"}\x94(\x8c\x01w" + _tensor() + b"\x94u",  # protocol 4 MEMOIZE, SHORT_BINUNICODE
        b"}(" + _str("w") + _tensor() + _str("opt") + b"}(K\x00}u" + _str("s") + b"cbuiltins\nset\n]K\x01a\x85Ru",
    ],
)
def test_unusual_but_valid_pickles_load(tmp_path, body):
    assert _load_all(_zip(tmp_path / "u.bin", body))["w"].tolist() == [0.0]


def test_attributes_set_by_build_on_a_state_dict_are_dropped(tmp_path):
    od = b"ccollections\nOrderedDict\n)R"
    body = od + b"}" + _str("items") + _str("not a method") + b"sb(" + _str("w") + _tensor() + b"u"
    obj = load_torch_zip(_zip(tmp_path / "od.bin", body))
    assert list(obj.items())[0][0] == "w" and obj["w"].load().tolist() == [0.0]


def test_hostile_corenet_checkpoint_through_the_cli(tmp_path):
    """The embedding has the shape the config expects, but 4 bytes of storage behind it."""
    config = OpenELMConfig.tiny()
    shape = (config.vocab_size, config.model_dim)
    embedding = _tensor(shape=shape, stride=(config.model_dim, 1))
    src = _zip(tmp_path / "checkpoint.pt", _state(embedding, _str("token_embeddings.weight")))
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(config.to_dict()))
    dst = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(src), "-o", str(dst), "--arch-config", str(arch)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{src}: tensor 'token_embeddings.weight': view (offset 0, shape {shape}" in result.output
    assert "runs past its storage 0 of 1 elements" in result.output and not dst.exists()


def test_the_malicious_pickle_is_still_refused(tmp_path):
    marker = tmp_path / "pwned"
    write_malicious_zip(tmp_path / "m.bin", marker)
    with pytest.raises(ValueError, match=r"m.bin: refusing to load: .* os.system"):
        load_torch_zip(tmp_path / "m.bin")
    assert not marker.exists()
