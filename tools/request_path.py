"""The project files whose code runs for one `generate` request, measured rather than read.

    python tools/request_path.py [--model builtin:tiny] [--json]

Starts a one-rank server (Scheduler + Engine, ZeroMQ on loopback, port 0) in this process, sends one warm-up
request, then traces every Python call made while a second request travels from the socket to the expert
all-to-all and back, and prints each project file with its number of calls (the client's own file is not
counted). docs/architecture.md lists the result; tests/test_code_shape.py checks that the list and the trace
agree, so the document cannot drift from the code.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launch", "runtime", "parallel", "ops", "cluster")


def trace_generate(model_path: str = "builtin:tiny") -> Counter:
    """{project file (relative to the repository): Python calls into it} for one greedy generate request."""
    sys.path.insert(0, str(ROOT))
    import runtime
    from runtime.client import Client
    from runtime.sched.scheduler import Scheduler
    from runtime.serve import Engine
    from runtime.serve.server import Server

    calls: Counter = Counter()
    tracing = threading.Event()
    client_file = str(ROOT / "runtime" / "client.py")

    def tracer(frame, event, arg):
        if event == "call" and tracing.is_set():
            name = frame.f_code.co_filename
            if name != client_file and name.startswith(str(ROOT)):
                rel = Path(name).relative_to(ROOT)
                if rel.parts[0] in PACKAGES:
                    calls[str(rel)] += 1

    model = runtime.load_model(model_path)
    threading.settrace(tracer)  # the server thread starts below, with the tracer installed
    engine = Engine(model, max_batch=4, max_model_len=128, page_size=8, kv_cache_tokens=512)
    server = Server(Scheduler(engine), bind="tcp://127.0.0.1:*").start()
    try:
        with Client(server.endpoint, timeout=120) as client:
            client.generate(prompt_ids=[1, 2, 3], max_tokens=2)  # warm-up: lazy imports and first-call paths
            tracing.set()
            client.generate(prompt_ids=[4, 5, 6, 7], max_tokens=3)
            tracing.clear()
    finally:
        threading.settrace(None)
        server.stop()
    return calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny", help="model path or builtin name (default builtin:tiny)")
    ap.add_argument("--json", action="store_true", help="print {file: calls} as JSON")
    args = ap.parse_args(argv)
    calls = trace_generate(args.model)
    if args.json:
        print(json.dumps(dict(sorted(calls.items())), indent=1))
        return 0
    for name, n in sorted(calls.items()):
        print(f"{n:6d}  {name}")
    outside = [f for f in calls if not f.startswith("ops/")]
    print(f"{len(outside)} files outside ops/, {len(calls)} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
