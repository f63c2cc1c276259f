"""Data order (as docs/training.md states it), data-parallel slices, seeded shuffling, token-file validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.train.data import DataError, TokenData, load_tokens


def _npy(tmp_path, arr, name="tokens.npy"):
    path = str(tmp_path / name)
    np.save(path, arr)
    return path


def test_unshuffled_order_is_the_contract(tmp_path):
    tokens = np.arange(1000, dtype=np.int32) * 7 % 251
    path = _npy(tmp_path, tokens)
    T, B = 16, 4
    data = TokenData(path, T, B, shuffle=False)
    assert data.num_windows == (1000 - 1) // T
    for s in (0, 1, 5):
        inputs, labels = data.batch(s)
        assert inputs.dtype == torch.int64 and inputs.shape == (B, T)
        for j in range(B):
            i = s * B + j
            window = tokens[i * T: i * T + T + 1]
            assert inputs[j].tolist() == window[:-1].tolist()
            assert labels[j].tolist() == window[1:].tolist()
    # past the end the order wraps around (next epoch)
    n = data.num_windows
    assert data.window_ids(n // B + 1)[0] == ((n // B + 1) * B) % n


def test_data_parallel_ranks_split_the_step(tmp_path):
    path = _npy(tmp_path, np.arange(2000, dtype=np.uint16))
    data = TokenData(path, 8, 8, shuffle=True, seed=3)
    whole, _ = data.batch(4)
    parts = [data.batch(4, r, 4)[0] for r in range(4)]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(DataError, match="divisible"):
        data.batch(0, 0, 3)


def test_shuffle_is_seeded_and_a_permutation_per_epoch(tmp_path):
    path = _npy(tmp_path, np.arange(40 * 8 + 1, dtype=np.int32))
    a = TokenData(path, 8, 5, shuffle=True, seed=1)
    b = TokenData(path, 8, 5, shuffle=True, seed=1)
    c = TokenData(path, 8, 5, shuffle=True, seed=2)
    epoch = [i for s in range(8) for i in a.window_ids(s)]  # 40 windows = one epoch
    assert sorted(epoch) == list(range(40))
    assert epoch != list(range(40))
    assert epoch == [i for s in range(8) for i in b.window_ids(s)]
    assert epoch != [i for s in range(8) for i in c.window_ids(s)]
    second = [i for s in range(8, 16) for i in a.window_ids(s)]
    assert sorted(second) == list(range(40)) and second != epoch


def test_memory_mapped_and_validated(tmp_path):
    path = _npy(tmp_path, np.arange(100, dtype=np.int32))
    assert isinstance(load_tokens(path), np.memmap)
    with pytest.raises(DataError, match="1-D"):
        load_tokens(_npy(tmp_path, np.zeros((4, 4), dtype=np.int32), "2d.npy"))
    with pytest.raises(DataError, match="float32"):
        load_tokens(_npy(tmp_path, np.zeros(10, dtype=np.float32), "f.npy"))
    with pytest.raises(DataError, match="does not exist"):
        load_tokens(str(tmp_path / "missing.npy"))
    with pytest.raises(DataError, match="too few"):
        TokenData(path, 128, 1, shuffle=False)
    with pytest.raises(DataError, match="unknown builtin"):
        load_tokens("builtin:nope")


def test_builtin_tinytext_is_bytes_and_deterministic():
    a, b = load_tokens("builtin:tinytext"), load_tokens("builtin:tinytext")
    assert a.ndim == 1 and 100_000 < len(a) < 400_000
    assert 0 <= a.min() and a.max() < 256
    assert np.array_equal(a, b)
    text = bytes(a[:2000].astype(np.uint8)).decode("utf-8", errors="strict")
    # readable text: words separated by spaces, nothing unprintable but line breaks (catches a stream read
    # with the wrong dtype or offset, which decodes to control bytes or fails to decode)
    assert " " in text and all(c.isprintable() or c == "\n" for c in text), repr(text[:200])
