"""Tokenizers: bytes for builtin:tiny, tokenizer.json through the `tokenizers` package."""

from __future__ import annotations

import json

import pytest

from runtime.model.tokenizer import ByteTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("builtin:tiny")
    ids = tok.encode("héllo ✓", add_bos=True)
    assert ids[0] == ByteTokenizer.BOS and max(ids[1:]) < 256
    assert tok.decode(ids + [ByteTokenizer.EOS]) == "héllo ✓"
    assert tok.vocab_size % 8 == 0


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.decoder = tokenizers.decoders.WordPiece()
    tk.save(str(tmp_path / "tokenizer.json"))
    json.dump(
        {"model_type": "deepseek_v3", "bos_token_id": 0, "eos_token_id": 2},
        open(tmp_path / "config.json", "w"),
    )
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("hello world") == [1, 2]
    assert tok.encode("hello", add_bos=True) == [0, 1] and tok.eos_id == 2
    assert tok.decode([1, 2]) == "hello world"  # the tokenizer.json's decoder joins the words, exactly


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
