"""Tokenizers: byte-level for builtin:tiny, and an HF `tokenizer.json` through the `tokenizers` package."""

from __future__ import annotations

import json
import os
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; BOS/EOS/PAD follow. The vocabulary is padded to 264 (a multiple of 8, so
    it splits evenly over tensor-parallel ranks); ids 259..263 are unused."""

    BOS, EOS, PAD = 256, 257, 258
    VOCAB_SIZE = 264

    def __init__(self) -> None:
        self.vocab_size = self.VOCAB_SIZE
        self.bos_id, self.eos_id, self.pad_id = self.BOS, self.EOS, self.PAD

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS] + ids if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Wraps `tokenizers.Tokenizer.from_file(tokenizer.json)`; BOS/EOS ids come from the model config."""

    def __init__(self, path: str, bos_id: int | None = None, eos_id: int | None = None) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # pragma: no cover - tokenizers ships with transformers
            raise ImportError(
                "loading tokenizer.json needs the 'tokenizers' package (pip install tokenizers)"
            ) from e
        self._tok = _Tok.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str) -> Tokenizer:
    """`builtin:tiny` -> bytes; a model dir with tokenizer.json -> HF tokenizer."""
    if path.startswith("builtin:"):
        return ByteTokenizer()
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tj):
        raise FileNotFoundError(
            f"{path}: no tokenizer.json (byte-level tokenization is only for builtin models)"
        )
    bos = eos = None
    cfg = os.path.join(path, "config.json")
    if os.path.exists(cfg):
        with open(cfg) as f:
            raw = json.load(f)
        bos = raw.get("bos_token_id")
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
    return HFTokenizer(tj, bos_id=bos, eos_id=eos)
