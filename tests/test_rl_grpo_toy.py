"""CI's short run of bench/grpo_toy.py: GRPO through the ZeroMQ server must raise the toy task's reward."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.timeout(180)
def test_grpo_toy_reward_rises():
    path = Path(__file__).resolve().parent.parent / "bench" / "grpo_toy.py"
    spec = importlib.util.spec_from_file_location("grpo_toy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lines: list[str] = []
    means = mod.run(rounds=20, lr=1e-2, seed=0, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    first, last = sum(means[:10]) / 10, sum(means[-10:]) / 10
    assert last > first + 0.15 and last > 2 * first, (first, last, means)
    assert lines[-1].startswith("mean reward: first 10 rounds") and len(lines) == 21
