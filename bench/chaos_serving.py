"""The serving drills of bench/chaos.py: hostile frames mixed with streaming clients, and vanishing clients,
against one `moerun serve` process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack
import zmq
from chaos_procs import Job, dealer, job_env, kill_all, report

from runtime.client import Client

CLIENT_TIMEOUT_S = 3.0  # serve.client_timeout_s of the serving drills


# --- hostile frames mixed with streaming clients, and vanishing clients ---------------------------------------
def _hostile_frames(vocab: int) -> list[tuple[str, list[bytes], int]]:
    """(kind, frames of one message, replies expected)."""
    p = msgpack.packb
    gen = {"op": "generate", "prompt_ids": [1, 2, 3], "max_tokens": 2}
    rows = [[i % vocab for i in range(4096)]] + [[1, 2]] * 4095
    return [
        ("garbage", [b"\xc1\xc1\xc1"], 1),
        ("not-a-map", [p([1, 2, 3])], 1),
        ("int-keys", [p({1: 2})], 1),
        ("unknown-op", [p({"op": "shutdown", "id": "x"})], 1),
        ("no-id", [p({"op": "generate", "prompt_ids": [1]})], 1),
        ("wrong-type", [p({**gen, "id": "w", "prompt_ids": "abc"})], 1),
        ("out-of-vocab", [p({**gen, "id": "v", "prompt_ids": [10**12]})], 1),
        ("nan-temperature", [p({**gen, "id": "n", "temperature": float("nan")})], 1),
        ("inf-top-p", [p({**gen, "id": "i", "top_p": float("inf")})], 1),
        ("tiny-temperature", [p({**gen, "id": "t", "temperature": 1e-39})], 1),  # served (greedy)
        ("tiny-top-p", [p({**gen, "id": "q", "temperature": 1.0, "top_p": 1e-46})], 1),  # served
        ("top-priority", [p({**gen, "id": "pr", "priority": 2**31 - 1})], 1),
        ("huge-max-tokens", [p({**gen, "id": "m", "max_tokens": 2**31 - 1})], 1),
        ("long-prompt", [p({**gen, "id": "l", "prompt_ids": [1] * 5000})], 1),
        ("foreign-abort", [p({"op": "abort", "id": "s0"})], 1),
        ("train-amplified", [p({"op": "train", "id": "a", "input_ids": rows})], 1),
        ("three-frames", [p({"op": "info"}), p({"op": "info"})], 1),
        ("deep-nesting", [b"\x91" * 100_000 + b"\xc0"], 1),
        ("unknown-field", [p({**gen, "id": "u", "evil": True})], 1),
        ("health", [p({"op": "health"})], 1),
    ]


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            fields[k] = int(v.split()[0]) // 1024
    return fields["VmRSS"], fields["VmHWM"]


def drill_hostile(job: Job, quick: bool) -> bool:
    n_streams, n_hostile, new = (32, 200, 8) if quick else (256, 2000, 16)
    ctx = zmq.Context()
    socks, hostile = [], []
    try:
        with Client(job.address, timeout=60) as c:
            c.generate(prompt_ids=[1, 2], max_tokens=2)  # warm
            vocab = c.info()["vocab_size"]
        rss0, _ = _rss(job.pid)
        kinds = _hostile_frames(vocab)
        hostile = [dealer(ctx, job.address) for _ in range(8)]
        expected = [0] * len(hostile)
        plan = [("stream", i) for i in range(n_streams)] + [("hostile", i) for i in range(n_hostile)]
        plan.sort(key=lambda x: (x[1] * 7919) % (n_streams + n_hostile))  # mixed, deterministic
        streams: dict[int, dict] = {}
        for what, i in plan:
            if what == "stream":
                s = dealer(ctx, job.address)
                s.send(msgpack.packb({"op": "generate", "id": f"s{i}", "prompt_ids": [1 + i % 200, 5, 9],
                                      "max_tokens": new, "stream": True, "ignore_eos": True}))
                socks.append(s)
                streams[i] = {"sock": s, "chunks": [], "done": None}
            else:
                _, frames, replies = kinds[i % len(kinds)]
                h = i % len(hostile)
                hostile[h].send_multipart(frames)
                expected[h] += replies
        # frames beyond the size bounds: one just over the soft bound (answered), one over the hard bound
        # (ZeroMQ drops that connection: no reply, by design)
        soft = dealer(ctx, job.address)
        soft.send(b"\x00" * ((1 << 20) + 1))
        hard = dealer(ctx, job.address)
        hard.send(b"\x00" * ((8 << 20) + 8192))
        got = [0] * len(hostile)
        pending = set(streams)
        deadline = time.monotonic() + (120 if quick else 600)
        poller = zmq.Poller()
        for s in [*socks, *hostile]:
            poller.register(s, zmq.POLLIN)
        by_sock = {id(st["sock"]): st for st in streams.values()}
        while (pending or got != expected) and time.monotonic() < deadline:
            for s, _ in poller.poll(1000):
                while s.poll(0):
                    msg = msgpack.unpackb(s.recv())
                    st = by_sock.get(id(s))
                    if st is None:
                        got[hostile.index(s)] += 1
                    elif msg["op"] == "token":
                        st["chunks"].extend(msg["ids"])
                    else:
                        st["done"] = msg
                        pending.discard(int(msg["id"][1:]))
        soft_answered = soft.poll(10_000) and msgpack.unpackb(soft.recv())["code"] == "bad_request"
        hard_dropped = not hard.poll(2_000)
        complete = sum(1 for st in streams.values() if st["done"] is not None and st["done"]["op"] == "done"
                       and st["chunks"] == st["done"]["ids"] and len(st["chunks"]) == new)
        rss1, hwm = _rss(job.pid)
        ok = (got == expected and complete == n_streams and soft_answered and hard_dropped
              and hwm - rss0 < 512)
        return report("hostile", ok, f"{sum(got)}/{sum(expected)} hostile frames answered (+1 over the soft "
                       f"bound answered={bool(soft_answered)}, +1 over the hard bound dropped={hard_dropped}); "
                       f"{complete}/{n_streams} streams got all {new} tokens; server RSS {rss0} -> {rss1} MiB "
                       f"(peak {hwm} MiB)")
    finally:
        for s in [*socks, *hostile]:
            s.close(0)
        ctx.destroy(0)


VANISHING_CLIENT = """
import sys, msgpack, zmq
s = zmq.Context().socket(zmq.DEALER)
s.connect(sys.argv[1])
for i in range(8):
    s.send(msgpack.packb({"op": "generate", "id": f"v{i}", "prompt_ids": [3, 1, 4, 1, 5], "max_tokens": 1500,
                          "stream": True, "ignore_eos": True}))
seen = set()
while len(seen) < 8:
    seen.add(msgpack.unpackb(s.recv())["id"])
print("streaming", flush=True)
sys.stdin.read()
"""


def drill_vanish(job: Job, how: signal.Signals) -> bool:
    name = f"vanish-{how.name.lower()}"
    with Client(job.address, timeout=60) as c:
        base = c.metrics()["metrics"]
        client = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, job.address], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=job_env("vanish"))
        try:
            if client.stdout.readline().strip() != "streaming":
                return report(name, False, "the client did not start streaming")
            held = c.metrics()["metrics"]["kv_pages_used"]
            t0 = time.monotonic()
            client.send_signal(how)
            deadline = t0 + 60
            while time.monotonic() < deadline:
                m = c.metrics()["metrics"]
                if m["requests_running"] == 0 and m["kv_pages_used"] == base["kv_pages_used"]:
                    break
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
        finally:
            client.kill()
            client.wait()
        aborted = m["requests_aborted_total"] - base["requests_aborted_total"]
        ok = m["requests_running"] == 0 and aborted == 8 and m["kv_pages_used"] == base["kv_pages_used"]
        bound = CLIENT_TIMEOUT_S + 5 if how == signal.SIGSTOP else 5
        ok = ok and elapsed < bound
        return report(name, ok, f"8 streams of a {how.name}ed client aborted ({aborted}); {held} KV pages back "
                       f"after {elapsed:.1f} s (serve.client_timeout_s={CLIENT_TIMEOUT_S:g})")


def serving_drills(quick: bool, only: set[str]) -> list[bool]:
    tag = uuid.uuid4().hex
    job = Job(["serve", "--bind", "tcp://127.0.0.1:*", "--set", "serve.max_model_len=4096", "--set",
               "serve.kv_cache_tokens=65536", "--set", "serve.page_size=16", "--set",
               f"serve.client_timeout_s={CLIENT_TIMEOUT_S}"], tag)
    try:
        job.listening()
        results = []
        if "hostile" in only:
            results.append(drill_hostile(job, quick))
        if "vanish" in only:
            results.append(drill_vanish(job, signal.SIGKILL))
            results.append(drill_vanish(job, signal.SIGSTOP))
        alive = job.proc.poll() is None
        code = job.stop()
        results.append(report("server-after", alive and code == 0, f"the server served on through every drill "
                               f"and stopped cleanly (exit {code})"))
        return results
    finally:
        kill_all(tag)
