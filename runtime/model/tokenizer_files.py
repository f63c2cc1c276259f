"""Tokenizer files for checkpoints and exports, so a trained model directory is self-contained.

builtin models tokenize bytes (`runtime.model.tokenizer.ByteTokenizer`: UTF-8 byte b is id b, then BOS/EOS/PAD);
`write_byte_tokenizer` writes the same mapping as an HF `tokenizer.json` (byte-level pre-tokenizer, one
token per byte, no merges, BOS prepended like the server does) that `runtime.model.tokenizer.load_tokenizer`
and transformers' AutoTokenizer read.
HF model directories have their own tokenizer files, which `copy_tokenizer_files` carries along."""

from __future__ import annotations

import json
import os
import shutil

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_byte_tokenizer(directory: str) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from runtime.model.tokenizer import ByteTokenizer

    table = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<bos>", "<eos>", "<pad>"] + [f"<unused{i}>" for i in range(259, ByteTokenizer.VOCAB_SIZE)]
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    if tok.token_to_id("<bos>") != ByteTokenizer.BOS or tok.get_vocab_size(True) != ByteTokenizer.VOCAB_SIZE:
        raise AssertionError("byte tokenizer ids do not match runtime.model.tokenizer.ByteTokenizer")
    # BOS first, as the server encodes a prompt (and DeepSeek's own tokenizers do): transformers' tokenizer
    # loaded from this directory then gives the same ids for the same text.
    bos = [("<bos>", ByteTokenizer.BOS)]
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=bos)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
                   "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": 4096}, f, indent=1)


def copy_tokenizer_files(source: str | None, directory: str) -> list[str]:
    """Put tokenizer files into `directory`: a byte tokenizer for `builtin:*`, else copies of the files
    `source` (a model directory) has. Returns the names written."""
    if source is None:
        return []
    if source.startswith("builtin:"):
        write_byte_tokenizer(directory)
        return ["tokenizer.json", "tokenizer_config.json"]
    done = []
    for name in TOKENIZER_FILES:
        src = os.path.join(source, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(directory, name))
            done.append(name)
    return done
