"""Writers for the checkpoint formats users bring, so tests build them without torch or the network.

`write_torch_zip` assembles torch's zip layout (data.pkl + data/N storages + byteorder) with
hand-written pickle opcodes, exactly as `torch.save` lays them out for a state dict.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor_pickle(key: str, storage: str, array_shape: tuple[int, ...], numel: int) -> bytes:
    strides = [int(np.prod(array_shape[i + 1 :])) for i in range(len(array_shape))]
    persistent = (
        _tuple([_str("storage"), b"ctorch\n" + storage.encode() + b"\n", _str(key), _str("cpu"), _int(numel)]) + b"Q"
    )
    args = _tuple(
        [
            persistent,
            _int(0),
            _tuple([_int(s) for s in array_shape]),
            _tuple([_int(s) for s in strides]),
            b"\x89",
            b"ccollections\nOrderedDict\n)R",
        ]
    )
    return b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"


def _bf16_bytes(a: np.ndarray) -> bytes:
    """Round-to-nearest-even float32 -> bfloat16 bytes."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def write_torch_zip(
    path: Path, tensors: dict[str, np.ndarray], wrap: str | None = None, extra: bytes = b"", dtype: str = "float32"
) -> None:
    """A torch-format zip holding a state dict (optionally nested under `wrap`, like CoreNet's
    training checkpoints), tensors stored as float32 or bfloat16."""
    storage = {"float32": "FloatStorage", "bfloat16": "BFloat16Storage"}[dtype]
    items = b"".join(
        _str(name) + _tensor_pickle(str(i), storage, a.shape, a.size) for i, (name, a) in enumerate(tensors.items())
    )
    state = b"}(" + items + b"u"
    body = b"}(" + _str(wrap) + state + _str("epoch") + _int(3) + b"u" if wrap else state
    pickle_bytes = b"\x80\x02" + body + extra + b"."
    prefix = path.stem + "/"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(prefix + "data.pkl", pickle_bytes)
        zf.writestr(prefix + "byteorder", "little")
        for i, a in enumerate(tensors.values()):
            data = _bf16_bytes(a) if dtype == "bfloat16" else np.ascontiguousarray(a, np.float32).tobytes()
            zf.writestr(f"{prefix}data/{i}", data)
        zf.writestr(prefix + "version", "3\n")


def write_malicious_zip(path: Path, marker: Path) -> None:
    """A torch zip whose pickle calls os.system (it must never run)."""
    payload = b"\x80\x02cos\nsystem\n" + _tuple([_str(f"touch {marker}")]) + b"R."
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file written by hand (float32), as Hugging Face's library lays it out."""
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        data = np.ascontiguousarray(a, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def hf_folder(root: Path, tensors: dict[str, np.ndarray], config: dict, fmt: str = "safetensors") -> Path:
    """An Apple-style Hugging Face folder: config.json and weights as `fmt`
    ("safetensors", "sharded", "bin", "sharded-bin")."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    if fmt == "safetensors":
        write_safetensors(root / "model.safetensors", tensors)
    elif fmt == "bin":
        write_torch_zip(root / "pytorch_model.bin", tensors)
    else:
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        ext = "safetensors" if fmt == "sharded" else "bin"
        stem = "model" if fmt == "sharded" else "pytorch_model"
        weight_map = {}
        for i, part in enumerate(halves, 1):
            file = f"{stem}-{i:05d}-of-00002.{ext}"
            subset = {n: tensors[n] for n in part}
            (write_safetensors if ext == "safetensors" else write_torch_zip)(root / file, subset)
            weight_map.update(dict.fromkeys(part, file))
        index = f"{stem}.{ext}.index.json"
        (root / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def corenet_state(tensors: dict[str, np.ndarray], padded_vocab: int) -> dict[str, np.ndarray]:
    """HF-keyed weights as CoreNet names them: no `transformer.` prefix, `classifier`, padded vocabulary."""
    out = {}
    for name, a in tensors.items():
        key = name.removeprefix("transformer.").replace("lm_head.", "classifier.")
        if key in ("token_embeddings.weight", "classifier.weight"):
            pad = np.random.default_rng(0).normal(size=(padded_vocab - a.shape[0], a.shape[1])).astype(np.float32)
            a = np.concatenate([a, pad])
        out[key] = a
    return out
