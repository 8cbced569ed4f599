"""The token file: written once and reused, BOS/EOS per document, uint32 past 65536, rank-split batches."""

import json

import numpy as np
import pytest

from openelm_mlx.training.data import DataError, TokenData, tokenize_to_file


def _encode(text: str) -> list[int]:
    return [ord(c) % 250 + 3 for c in text]


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("first document")
    (tmp_path / "docs" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n" + json.dumps({"text": "third"}))
    (tmp_path / "tok.model").write_bytes(b"stand-in tokenizer bytes for the cache key")
    return tmp_path


def test_documents_are_wrapped_in_bos_eos_and_the_file_is_reused(corpus):
    args = ([corpus / "docs"], _encode, 1, 2, 300, corpus / "tok.model", corpus / "cache")
    path = tokenize_to_file(*args)
    tokens = np.fromfile(path, dtype=np.uint16)
    expected = [1, *_encode("first document"), 2, 1, *_encode("second"), 2, 1, *_encode("third"), 2]
    assert tokens.tolist() == expected
    mtime = path.stat().st_mtime_ns
    assert tokenize_to_file(*args) == path and path.stat().st_mtime_ns == mtime  # cached, not rewritten
    (corpus / "docs" / "a.txt").write_text("changed")
    assert tokenize_to_file(*args) != path  # a changed corpus is tokenized again


def test_large_vocabularies_use_uint32(corpus):
    path = tokenize_to_file(
        [corpus / "docs" / "a.txt"], lambda t: [70_000], 1, 2, 80_000, corpus / "tok.model", corpus / "cache"
    )
    assert json.loads(path.with_suffix(".json").read_text())["dtype"] == "uint32"  # recorded, not guessed
    assert TokenData.from_tokens(np.fromfile(path, np.uint32), 0.0, 1).train.tolist() == [1, 70_000, 2]


def test_rank_slices_make_up_the_global_batch():
    data = TokenData.from_tokens(np.arange(5000, dtype=np.uint16), 0.1, 16)
    x, y = data.batch(step=7, seed=3, batch_size=4, seq_len=16)
    halves = [data.batch(step=7, seed=3, batch_size=2, seq_len=16, rank=r, world=2) for r in (0, 1)]
    global_x, _ = data.batch(step=7, seed=3, batch_size=4, seq_len=16, world=1)
    assert np.array_equal(np.concatenate([h[0] for h in halves]), global_x)
    assert np.array_equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one
    assert x.max() < len(data.train)  # windows never reach into the held-out tail


def test_too_little_data_is_a_clear_error():
    with pytest.raises(DataError, match="10 tokens is too few for seq_len 64"):
        TokenData.from_tokens(np.arange(10), 0.0, 64)
