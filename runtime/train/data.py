"""Token data and its order: a 1-D token file (`.npy`, memory-mapped) or `builtin:tinytext`.

The order is a pure function of (step, seed), so a resumed run needs only the step number to continue
exactly, whatever the layout. The documented order (docs/training.md): window i is `tokens[i*T : i*T + T + 1]` (inputs =
window[:-1], labels = window[1:]); optimizer step s (0-based) uses windows `s*B ... (s+1)*B - 1` with
`shuffle = false`, wrapping around at the end of the data (epochs). With `shuffle = true`, epoch e walks a
permutation of the windows drawn from `numpy.random.default_rng([seed, e])`. A data-parallel rank takes
the contiguous slice `[r*B/dp, (r+1)*B/dp)` of its step's B windows.
"""

from __future__ import annotations

import os

import numpy as np
import torch

BUILTIN_TINYTEXT = "builtin:tinytext"
DTYPES = (np.int32, np.uint16, np.int64)


class DataError(ValueError):
    """A token file or data setting that cannot work; the message names the file and the problem."""


def load_tokens(path: str) -> np.ndarray:
    """The 1-D token array: `builtin:tinytext`, or a `.npy` file opened memory-mapped (int32/uint16/int64)."""
    if path == BUILTIN_TINYTEXT:
        from runtime.train.corpus import tinytext_tokens

        return tinytext_tokens()
    if path.startswith("builtin:"):
        raise DataError(f"unknown builtin data set {path!r} (known: {BUILTIN_TINYTEXT})")
    if not os.path.isfile(path):
        raise DataError(f"data.path {path!r} does not exist (expected a 1-D .npy token file or "
                        f"{BUILTIN_TINYTEXT})")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"data.path {path!r}: not a readable .npy array ({exc})") from None
    if tokens.ndim != 1:
        raise DataError(f"data.path {path!r}: expected a 1-D token array, got shape {tokens.shape}")
    if tokens.dtype.type not in DTYPES:
        raise DataError(f"data.path {path!r}: dtype {tokens.dtype} is not one of int32, uint16, int64")
    return tokens


class TokenData:
    """Windows of `seq_len + 1` tokens in the documented order; `batch(step)` gives this rank's share."""

    def __init__(self, path: str, seq_len: int, global_batch: int, shuffle: bool, seed: int = 0,
                 tokens: np.ndarray | None = None) -> None:
        if seq_len < 1:
            raise DataError(f"data.seq_len must be >= 1, got {seq_len}")
        if global_batch < 1:
            raise DataError(f"train.global_batch must be >= 1, got {global_batch}")
        self.path = path
        self.tokens = load_tokens(path) if tokens is None else tokens
        self.seq_len, self.global_batch, self.shuffle, self.seed = seq_len, global_batch, shuffle, seed
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"data.path {path!r}: {len(self.tokens)} tokens is too few for one window of "
                            f"seq_len + 1 = {seq_len + 1}")
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def window_ids(self, step: int) -> list[int]:
        """The global window indices of optimizer step `step` (0-based), in order."""
        out = []
        for j in range(step * self.global_batch, (step + 1) * self.global_batch):
            epoch, pos = divmod(j, self.num_windows)
            out.append(int(self._epoch_order(epoch)[pos]) if self.shuffle else pos)
        return out

    def window(self, i: int) -> np.ndarray:
        t = self.seq_len
        return np.asarray(self.tokens[i * t: i * t + t + 1], dtype=np.int64)

    def batch(self, step: int, rank: int = 0, ranks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) LongTensors [B/ranks, T] of data-parallel rank `rank` for step `step`."""
        if self.global_batch % ranks:
            raise DataError(f"train.global_batch = {self.global_batch} is not divisible by dp = {ranks}")
        per = self.global_batch // ranks
        ids = self.window_ids(step)[rank * per: (rank + 1) * per]
        win = torch.from_numpy(np.stack([self.window(i) for i in ids]))
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_windows
