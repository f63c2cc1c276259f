"""Streamed text: never a split character, and the chunks add up to `done.text` (runtime/serve/detok.py).

Two tokenizers: the byte tokenizer of builtin:tiny (every non-ASCII character spans several ids) and a
byte-level BPE trained here on mixed-script text (merges that end inside a character, as real byte-level
vocabularies have). A random model samples their ids almost uniformly, so outputs are full of characters
cut across ids, invalid sequences and special tokens.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from runtime.client import Client
from runtime.model.builtin import init_weights
from runtime.model.config import builtin_tiny_config
from runtime.model.loading import build_model
from runtime.model.tokenizer import ByteTokenizer, HFTokenizer
from runtime.sched.scheduler import Scheduler
from runtime.serve import Engine
from runtime.serve.detok import StreamText
from runtime.serve.server import Server

CORPUS = [
    "你好，世界。今天天气很好，我们去公园散步吧。机器学习模型正在训练。",
    "こんにちは世界。東京の天気は晴れです。日本語のテキストを処理します。",
    "안녕하세요 세계. 오늘 날씨가 좋습니다.",
    "Γειά σου κόσμε. Привет, мир! Ünïcödé façade naïve café.",
    "emoji 🙂🚀🎉👍🏽 and math ∑∫√∞ ≤ ≥ ≠ and arrows →←↑↓.",
    "plain ASCII text with the quick brown fox jumps over the lazy dog 0123456789.",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE (ByteLevel pre-tokenizer and decoder, 256 byte tokens + merges), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    hf = HFTokenizer(str(path), bos_id=tok.token_to_id("<bos>"), eos_id=tok.token_to_id("<eos>"))
    # merges that end inside a character: a token whose bytes alone are not valid UTF-8
    partial = [i for i in range(hf.vocab_size) if "\ufffd" in hf.decode([i]) and len(tok.id_to_token(i)) > 1]
    assert len(partial) >= 10, "the trained vocabulary has too few merges that end inside a character"
    return hf


def _server(tokenizer, vocab: int) -> Server:
    cfg = dataclasses.replace(builtin_tiny_config(), vocab_size=vocab)
    model = build_model(cfg)
    init_weights(model, seed=3)
    engine = Engine(model.eval(), max_batch=32, max_model_len=128, max_prefill_tokens=256, page_size=8,
                    kv_cache_tokens=4096)
    return Server(Scheduler(engine), bind="tcp://127.0.0.1:*", tokenizer=tokenizer).start()


def test_stream_text_on_random_ids_adds_up(bpe):
    """Random id sequences pushed in random slices: no chunk ends in a character the whole text does not
    have there, and the chunks concatenate to the decode of all ids."""
    for tok in (ByteTokenizer(), bpe):
        for seed in range(200):
            rng = random.Random(seed)
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
            st, chunks, i = StreamText(tok), [], 0
            while i < len(ids):
                n = rng.choice((1, 1, 1, 2, 3))
                chunks.append(st.push(ids[i:i + n]))
                i += n
            chunks.append(st.finish())
            full = tok.decode(ids)
            assert "".join(chunks) == full == st.text
            pos = 0
            for c in chunks[:-1]:  # before the end, a chunk never ends where the final text is incomplete
                pos += len(c)
                assert not c.endswith("\ufffd") or full[pos - 1] == "\ufffd"


def test_incomplete_character_is_held_back():
    """The bytes of 你 (E4 BD A0) one id each: nothing until the character is whole; an incomplete one left
    at the end comes out as the U+FFFD the whole text has."""
    st = StreamText(ByteTokenizer())
    assert [st.push([b]) for b in (0x41, 0xE4, 0xBD, 0xA0, 0xE4)] == ["A", "", "", "你", ""]
    assert st.finish() == "\ufffd" and st.text == "A你\ufffd"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("which", ["bytes", "bpe"])
def test_streamed_text_adds_up_to_done_text_over_many_seeds(which, bpe):
    """64 sampled requests (temperature 1, seeds 0..63) streamed over ZeroMQ: for each, the `text` of its
    `token` replies concatenates to `done.text`, which is the decode of every generated id; and decoding
    each reply's ids alone (the old way) would not have, for many of them."""
    tok = ByteTokenizer() if which == "bytes" else bpe
    server = _server(tok, tok.vocab_size)
    try:
        with Client(server.endpoint, timeout=120) as c:
            prompts = ["你好，世界", "🙂 café", "こんにちは", "plain"]
            rids = {c.submit(prompt=prompts[s % 4], stream=True, max_tokens=40, temperature=1.0, seed=s,
                             ignore_eos=True): s for s in range(64)}
            split_somewhere = 0
            for rid in rids:
                chunks, per_token = [], []
                while True:
                    msg = c.recv(rid)
                    assert msg["op"] in ("token", "done"), msg
                    if msg["op"] == "done":
                        break
                    chunks.append(msg["text"])
                    per_token.append(tok.decode(msg["ids"]))
                assert len(msg["ids"]) == 40
                assert msg["text"] == tok.decode(msg["ids"])
                assert "".join(chunks) == msg["text"], f"seed {rids[rid]}"
                split_somewhere += "".join(per_token) != msg["text"]
        assert split_somewhere >= 16, f"only {split_somewhere} of 64 outputs split a character across replies"
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_abort_sends_held_back_text(bpe):
    """An aborted stream's chunks add up to `done.text` too (held-back text comes in a last `token`)."""
    tok = ByteTokenizer()
    server = _server(tok, tok.vocab_size)
    try:
        with Client(server.endpoint, timeout=60) as c:
            # abort right after the first reply, wherever the output stands
            rid = c.submit(prompt="x", stream=True, max_tokens=100, temperature=1.0, seed=1, ignore_eos=True)
            chunks = []
            first = c.recv(rid)
            chunks.append(first["text"])
            c.abort(rid)
            while True:
                msg = c.recv(rid)
                if msg["op"] == "done":
                    break
                chunks.append(msg["text"])
        assert msg["finish_reason"] == "abort"
        assert "".join(chunks) == msg["text"] == tok.decode(msg["ids"])
    finally:
        server.stop()
