"""The ZeroMQ server end to end (server thread + real sockets on loopback, port 0)."""

from __future__ import annotations

import random

import msgpack
import pytest
import torch
import zmq
from hf_models import make_hf_model

import runtime
from runtime.client import Client, ServerError
from runtime.sched.scheduler import Scheduler
from runtime.serve import Engine
from runtime.serve.server import Server

NEW = 64


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    path, hf = make_hf_model(tmp_path_factory.mktemp("v3serve"), "deepseek_v3", seed=11)
    return runtime.load_model(path), hf


def _server(model, **kw) -> Server:
    opts = dict(max_batch=16, max_model_len=256, max_prefill_tokens=24, page_size=8, kv_cache_tokens=2048)
    opts.update({k: kw.pop(k) for k in list(kw) if k in opts})
    return Server(Scheduler(Engine(model, **opts)), bind="tcp://127.0.0.1:*", **kw).start()


@pytest.fixture(scope="module")
def server(hf_pair):
    srv = _server(hf_pair[0], max_queue=512)
    yield srv
    srv.stop()


@pytest.mark.timeout(300)
def test_greedy_over_zmq_equals_hf_generate(hf_pair, server):
    model, hf = hf_pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 40, 9)]
    with Client(server.endpoint, timeout=120) as c:
        rids = [c.submit(prompt_ids=p, max_tokens=NEW, logprobs=5, ignore_eos=True) for p in prompts]
        done = [c.recv(r) for r in rids]  # all four were in flight together
    hf.generation_config.eos_token_id = None  # the server is told ignore_eos; HF must not stop early
    for p, d in zip(prompts, done):
        assert d["op"] == "done" and d["finish_reason"] == "length", d
        ids = torch.tensor([p])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        ref = out.sequences[0, len(p):].tolist()
        assert d["ids"] == ref
        ref_lp = torch.stack([torch.log_softmax(s[0].float(), -1) for s in out.scores])  # [NEW, V]
        got = torch.tensor(d["logprobs"])
        assert (got - ref_lp[torch.arange(NEW), torch.tensor(ref)]).abs().max().item() < 1e-4
        top = d["top_logprobs"]
        assert len(top) == NEW and all(len(t) == 5 for t in top)
        best = ref_lp.topk(5, dim=-1)
        assert [t[0][0] for t in top] == best.indices[:, 0].tolist()
        assert max(abs(t[i][1] - best.values[k, i].item()) for k, t in enumerate(top) for i in range(5)) < 1e-4
        assert d["usage"] == {"prompt_tokens": len(p), "completion_tokens": NEW, "cached_tokens": 0}


@pytest.mark.timeout(300)
def test_256_concurrent_streams_complete_in_order(hf_pair, server):
    ctx = zmq.Context.instance()
    n, want = 256, 6
    rng = random.Random(0)
    vocab = hf_pair[0].config.vocab_size
    socks, streams = [], {}
    poller = zmq.Poller()
    try:
        for i in range(n):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(server.endpoint)
            poller.register(s, zmq.POLLIN)
            socks.append(s)
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 20))]
            s.send(msgpack.packb({"op": "generate", "id": f"s{i}", "prompt_ids": prompt, "max_tokens": want,
                                  "stream": True, "ignore_eos": True}))
            streams[s] = {"chunks": [], "done": None}
        pending = n
        for _ in range(20000):  # bounded loop
            if not pending:
                break
            for s, _ in poller.poll(60000):
                while True:
                    try:
                        msg = msgpack.unpackb(s.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    st = streams[s]
                    assert st["done"] is None, "a message after done"
                    if msg["op"] == "token":
                        st["chunks"].extend(msg["ids"])
                    else:
                        assert msg["op"] == "done", msg
                        st["done"] = msg
                        pending -= 1
        assert pending == 0
        for i, s in enumerate(socks):
            st = streams[s]
            assert st["done"]["id"] == f"s{i}"
            # in order, nothing lost or repeated: the streamed chunks are exactly done's ids
            assert st["chunks"] == st["done"]["ids"] and len(st["chunks"]) == want
    finally:
        for s in socks:
            s.close(0)
    m = Client(server.endpoint).metrics()["metrics"]
    assert m["requests_running"] == 0 and m["kv_pages_used"] == 0


@pytest.mark.timeout(240)
def test_generation_stops_at_the_models_eos(tmp_path):
    """The default path (no ignore_eos): a model whose config.json names an EOS token stops right after
    generating it, with finish_reason "stop" and the EOS as the last id, exactly where transformers'
    generate stops; ignore_eos=True runs past it to max_tokens, and a prompt that never reaches the EOS
    ends by length. Catches an engine that ignores the checkpoint's eos_token_id, stops one token late or
    early, drops the EOS from the reply, or applies the EOS when told to ignore it."""
    import json

    path, hf = make_hf_model(tmp_path / "eos", "deepseek_v3", seed=11)
    prompt = torch.randint(0, 96, (9,), generator=torch.Generator().manual_seed(21)).tolist()
    greedy = runtime.load_model(path)
    gen = _greedy(greedy, prompt, 24)  # the EOS: the first generated token that is new at position >= 4
    j = next(i for i in range(4, 24) if gen[i] not in gen[:i])
    eos = gen[j]
    cfg = json.loads((tmp_path / "eos" / "config.json").read_text())
    (tmp_path / "eos" / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=eos)))
    other = next(p for p in ([t] * 3 for t in range(96)) if eos not in _greedy(greedy, p, 24))
    srv = _server(runtime.load_model(path))
    try:
        with Client(srv.endpoint) as c:
            stopped = c.generate(prompt_ids=prompt, max_tokens=24)
            ignored = c.generate(prompt_ids=prompt, max_tokens=24, ignore_eos=True)
            never = c.generate(prompt_ids=other, max_tokens=24)
    finally:
        srv.stop()
    hf.generation_config.eos_token_id = eos
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=24, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert ref == gen[: j + 1] and ref[-1] == eos  # transformers stops right after the EOS
    assert stopped["ids"] == ref and stopped["finish_reason"] == "stop", (stopped, ref)
    assert stopped["usage"]["completion_tokens"] == j + 1
    assert ignored["ids"] == gen and ignored["finish_reason"] == "length"
    assert len(never["ids"]) == 24 and never["finish_reason"] == "length"


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model.logits(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.timeout(120)
def test_abort_mid_stream_returns_pages(hf_pair, server):
    with Client(server.endpoint) as c:
        base = c.metrics()["metrics"]["kv_pages_used"]
        rid = c.new_id()
        got = []
        for msg in c.stream(prompt_ids=list(range(30)), max_tokens=200, ignore_eos=True, request_id=rid):
            if msg["op"] == "token":
                got.extend(msg["ids"])
                if len(got) == 3:
                    during = c.metrics()["metrics"]["kv_pages_used"]
                    c.abort(rid)
            else:
                done = msg
        assert done["finish_reason"] == "abort" and done["ids"][: len(got)] == got
        assert during > base
        assert c.metrics()["metrics"]["kv_pages_used"] == base
        with pytest.raises(ServerError) as e:
            c.request("abort", id="no-such-request")
        assert e.value.code == "bad_request"


def _malformed(rng: random.Random, i: int) -> bytes:
    kind = i % 10
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    if kind == 1:
        return msgpack.packb(rng.choice([1, "x", [1, 2], None, 3.5, b"raw", True]))
    if kind == 2:
        return msgpack.packb({"op": f"nope{i}", "id": "a"})
    if kind == 3:
        return msgpack.packb({"op": "generate", "id": "a", "prompt_ids": [rng.randrange(10**6, 10**9)]})
    if kind == 4:
        return msgpack.packb({"op": "generate", "id": "a", "prompt_ids": [1], "max_tokens": -rng.randrange(1, 9)})
    if kind == 5:
        return msgpack.packb({"op": "generate", "id": "a", "prompt_ids": [1],
                              rng.choice(["temperature", "top_p", "top_k", "logprobs"]): rng.choice(
                                  [-1, 1e300, "hot", [1], float("nan"), 10**12])})
    if kind == 6:
        return b"\x81\xa2op" + b"\xdb" + (2**31).to_bytes(4, "big")  # str header claiming 2 GiB
    if kind == 7:
        return msgpack.packb({"op": "generate", "id": "a", "prompt_ids": [1] * 1000, "max_tokens": 10})  # too_long
    if kind == 8:
        return msgpack.packb({"op": "generate", "id": 5, "prompt_ids": "abc", "stream": "yes"})
    return msgpack.packb({"op": "generate", "id": "a", "prompt_ids": [1], "junk": bytes(1 << 16)})


@pytest.mark.timeout(300)
def test_malformed_frames_each_get_an_error(hf_pair):
    """1100 bad frames (garbage, wrong types, unknown ops and values, too long, oversized) each get an error
    reply, the server serves correctly after them, and it keeps nothing per bad frame: Python memory traced
    across the server thread and this one (tracemalloc, after a warm-up of 100 frames) grows by less than
    4 KiB over the last 1000 frames (measured: 80-140 bytes). Catches a server that keeps anything per bad
    frame, down to a list of references (8 KB here), which the process's peak RSS would never show."""
    import gc
    import tracemalloc

    srv = _server(hf_pair[0], max_frame_bytes=32 * 1024)
    try:
        rng = random.Random(1)
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(srv.endpoint)
        codes: dict[str, int] = {}
        n, warmup = 1100, 100
        tracemalloc.start()
        try:
            for i in range(n):
                if i == warmup:
                    gc.collect()
                    base = tracemalloc.get_traced_memory()[0]
                frame = bytes(40 * 1024) if i % 100 == 99 else _malformed(rng, i)  # some oversized frames
                s.send(frame)
                assert s.poll(30000), f"no reply to malformed frame {i}"
                reply = msgpack.unpackb(s.recv())
                assert reply["op"] == "error" and reply["message"], reply
                codes[reply["code"]] = codes.get(reply["code"], 0) + 1
                del frame, reply
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert grown < 4096, f"traced memory grew by {grown} bytes over {n - warmup} bad frames"
        assert sum(codes.values()) == n
        assert {"bad_request", "unknown_op", "too_long"} <= set(codes)
        # multi-frame message: also an error
        s.send_multipart([b"a", b"b"])
        assert msgpack.unpackb(s.recv())["code"] == "bad_request"
        with Client(srv.endpoint) as c:  # still serving, correctly
            assert c.health()["ok"] is True
            d = c.generate(prompt_ids=[1, 2, 3], max_tokens=4, ignore_eos=True)
            ref = hf_pair[0].logits(torch.tensor([[1, 2, 3]]))[0, -1].argmax().item()
            assert d["ids"][0] == ref and len(d["ids"]) == 4
        assert not srv.active and srv.engine.num_active() == 0
        s.close(0)
    finally:
        srv.stop()


@pytest.mark.timeout(120)
def test_prefix_cache_hit_on_repeated_prompt(hf_pair):
    srv = _server(hf_pair[0], page_size=8, max_prefill_tokens=64)
    try:
        prompt = list(torch.randint(0, 96, (100,), generator=torch.Generator().manual_seed(3)).tolist())
        with Client(srv.endpoint) as c:
            first = c.generate(prompt_ids=prompt, max_tokens=4, ignore_eos=True)
            m1 = c.metrics()["metrics"]
            second = c.generate(prompt_ids=prompt, max_tokens=4, ignore_eos=True)
            m2 = c.metrics()["metrics"]
        assert first["ids"] == second["ids"]
        assert first["usage"]["cached_tokens"] == 0
        assert second["usage"]["cached_tokens"] == (len(prompt) - 1) // 8 * 8  # 96 of 100 tokens reused
        assert m2["prefix_cache_hits_tokens_total"] - m1["prefix_cache_hits_tokens_total"] == 96
        assert m2["prefix_cache_hit_rate"] > 0
        assert "moerun_time_to_first_token_seconds_count 2" in c_prom(srv)
    finally:
        srv.stop()


def c_prom(srv: Server) -> str:
    with Client(srv.endpoint) as c:
        return c.metrics()["prometheus"]


@pytest.mark.timeout(120)
def test_queue_full_too_long_info_health(hf_pair):
    srv = _server(hf_pair[0], max_queue=2, max_batch=1)
    try:
        with Client(srv.endpoint) as c:
            info = c.info()
            assert info["kv_cache"]["values_per_token_per_layer"] == 16 + 8
            assert info["versions"]["torch"] == torch.__version__
            with pytest.raises(ServerError) as e:
                c.generate(prompt_ids=[1] * 200, max_tokens=100)
            assert e.value.code == "too_long"
            rids = [c.submit(prompt_ids=[1, 2], max_tokens=50, ignore_eos=True) for _ in range(8)]
            replies = [c.recv(r) for r in rids]
            codes = [r.get("code") for r in replies if r["op"] == "error"]
            assert codes and set(codes) == {"queue_full"}
            assert sum(r["op"] == "done" for r in replies) >= 2  # at least the 2 queue places were served
            h = c.health()
            assert h["ok"] is True and h["latency_s"] >= 0
    finally:
        srv.stop()


# Runs inside a fresh network namespace (`unshare --net`): the default port 5555 is private there, so the
# real default can be served without touching the host's ports. Prints one JSON line with what it saw.
LOOPBACK_PROBE = r"""
import fcntl, json, os, signal, socket, struct, subprocess, sys, time

# bring `lo` up (a new namespace has it down), with ioctls rather than iproute2
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
req = struct.pack("16sH14s", b"lo", 0, b"")
flags = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, req))[1]          # SIOCGIFFLAGS
fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 0x1, b""))  # SIOCSIFFLAGS |= IFF_UP

srv = subprocess.Popen([sys.executable, "-m", "launch", "serve", "--model", "builtin:tiny"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
try:
    line = srv.stdout.readline()
    if "listening on" not in line:
        raise SystemExit("no start-up line: " + line + srv.stderr.read())
    endpoint = line.split("listening on ")[1].split()[0]
    # the server's listening sockets, from its fds and the namespace's socket tables
    inodes = set()
    for fd in os.listdir(f"/proc/{srv.pid}/fd"):
        target = os.readlink(f"/proc/{srv.pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for row in open(f"/proc/net/{table}").read().splitlines()[1:]:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                raw = bytes.fromhex(f[1].split(":")[0])
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word byte order
                fam = socket.AF_INET if width == 8 else socket.AF_INET6
                listening.append(f"{socket.inet_ntop(fam, words)}:{int(f[1].split(':')[1], 16)}")
    from runtime.client import Client
    with Client(endpoint, timeout=60) as c:
        healthy = c.health()["ok"]
    other = {}
    for addr in ("127.0.0.2",):  # routed to lo, but not the address bound: refused unless bound to *
        with socket.socket() as probe:
            probe.settimeout(5)
            other[addr] = probe.connect_ex((addr, int(endpoint.rsplit(":", 1)[1])))
    print(json.dumps({"endpoint": endpoint, "listening": listening, "healthy": healthy, "other": other}),
          flush=True)
finally:
    srv.send_signal(signal.SIGTERM)
    srv.communicate(timeout=60)
"""


@pytest.mark.timeout(120)
def test_serve_binds_loopback_by_default(tmp_path):
    """`moerun serve` with no --bind and no config file, in its own network namespace: the socket is
    tcp://127.0.0.1:5555, its only listening address is 127.0.0.1, a client there gets a health reply, and a
    connection to 127.0.0.2 (also loopback, but not the bound address) is refused. Catches a default bind of
    `tcp://*:5555` (or 0.0.0.0), or a CLI that drops the default, exposing the unauthenticated protocol."""
    import errno
    import json
    import shutil
    import subprocess
    import sys

    from tests.launchers import ROOT, base_env

    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a network namespace here (unshare --net needs root / CAP_SYS_ADMIN)")
    (tmp_path / "probe.py").write_text(LOOPBACK_PROBE)
    r = subprocess.run([unshare, "--net", sys.executable, str(tmp_path / "probe.py")], capture_output=True,
                       text=True, timeout=110, cwd=ROOT, env=base_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["endpoint"] == "tcp://127.0.0.1:5555", seen
    assert seen["listening"] == ["127.0.0.1:5555"], seen
    assert seen["healthy"] is True
    assert seen["other"] == {"127.0.0.2": errno.ECONNREFUSED}, seen


@pytest.mark.timeout(120)
def test_async_client_stream_generate_abort(hf_pair, server):
    import asyncio

    from runtime.client import AsyncClient

    async def main():
        async with AsyncClient(server.endpoint) as c:
            streamed = [m async for m in c.stream(prompt_ids=[4, 5, 6], max_tokens=5, ignore_eos=True)]
            done = await c.generate(prompt_ids=[4, 5, 6], max_tokens=5, ignore_eos=True, seed=1)
            h = await c.health()
            rid = c.new_id()
            got = []
            async for m in c.stream(prompt_ids=[7], max_tokens=200, ignore_eos=True, request_id=rid):
                got.append(m)
                if len(got) == 2:
                    await c.abort(rid)
            with pytest.raises(ServerError):
                await c.generate(prompt_ids=[1], max_tokens=0)
            return streamed, done, h, got

    streamed, done, h, got = asyncio.run(main())
    assert [m["op"] for m in streamed] == ["token"] * 5 + ["done"]
    assert [m["ids"][0] for m in streamed[:-1]] == streamed[-1]["ids"] == done["ids"]
    assert h["ok"] and got[-1]["finish_reason"] == "abort"
