"""`builtin:tinytext`: a small English-like corpus generated from a seeded grammar (no download, no
licence question). It is regular enough that a tiny model's loss falls quickly, which is all the demo and
the tests need. Byte-tokenized by `ByteTokenizer` (UTF-8 bytes are ids 0..255)."""

from __future__ import annotations

import functools
import random

import numpy as np

_NAMES = ["Ada", "Bram", "Cleo", "Dov", "Elin", "Farid", "Greta", "Hugo", "Iris", "Jonas", "Kira", "Lev",
          "Mara", "Nils", "Olga", "Pia", "Quinn", "Rosa", "Sven", "Tara"]
_NOUNS = ["river", "garden", "lantern", "harbour", "mountain", "library", "market", "forest", "bridge",
          "tower", "meadow", "kitchen", "village", "window", "letter", "boat", "orchard", "station", "clock",
          "mill"]
_ADJS = ["old", "quiet", "bright", "small", "golden", "narrow", "green", "cold", "distant", "busy",
         "gentle", "wide", "dark", "warm", "hidden"]
_VERBS = ["walked to", "looked at", "painted", "found", "left", "remembered", "visited", "cleaned",
          "repaired", "watched", "crossed", "opened", "followed", "described", "counted"]
_TIMES = ["In the morning", "At noon", "In the evening", "Before dawn", "After the rain", "On Sunday",
          "Later that year", "Every spring", "Once", "At night"]
_ENDS = ["and smiled.", "without a word.", "with great care.", "for a long time.", "again and again.",
         "as the bells rang.", "while the wind rose.", "and went home."]


def _sentence(r: random.Random) -> str:
    kind = r.randrange(4)
    a, b = r.choice(_NAMES), r.choice(_NAMES)
    noun, adj, verb = r.choice(_NOUNS), r.choice(_ADJS), r.choice(_VERBS)
    if kind == 0:
        return f"{r.choice(_TIMES)}, {a} {verb} the {adj} {noun} {r.choice(_ENDS)}"
    if kind == 1:
        return f"{a} and {b} {verb} the {noun} {r.choice(_ENDS)}"
    if kind == 2:
        return f"The {noun} was {adj}, so {a} {verb} it {r.choice(_ENDS)}"
    n = r.randrange(2, 10)
    return f"{a} counted {n} {noun}s by the {adj} {r.choice(_NOUNS)}."


@functools.lru_cache(maxsize=2)
def tinytext(num_bytes: int = 262_144, seed: int = 1234) -> str:
    """About `num_bytes` of text (paragraphs of generated sentences), the same on every call and machine."""
    r = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < num_bytes:
        para = " ".join(_sentence(r) for _ in range(r.randrange(3, 8))) + "\n\n"
        parts.append(para)
        size += len(para)
    return "".join(parts)[:num_bytes]


def tinytext_tokens() -> np.ndarray:
    """The corpus as a 1-D int32 array of byte ids."""
    return np.frombuffer(tinytext().encode("utf-8"), dtype=np.uint8).astype(np.int32)
