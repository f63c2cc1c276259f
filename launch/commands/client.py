"""`moerun client`: talk to a running `moerun serve` over ZeroMQ."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "talk to a running server: generate, health, info, metrics, abort, save (keygen: CurveZMQ keys)"
DESCRIPTION = """\
Send one request to a moerun server and print the reply (docs/protocol.md describes every field).

  generate  --prompt TEXT | --prompt-ids 1,2,3  [--max-tokens N] [--temperature T] [--top-p P] [--top-k K]
            [--seed S] [--stop-ids 5,6] [--logprobs K] [--priority P] [--ignore-eos] [--stream]
            prints the text (when the server has a tokenizer and the prompt was text) or the token ids;
            --stream prints tokens as they arrive; --json prints the raw reply maps.
  health    a real one-token generation on the server; exit status 0 when healthy.
  info      model, layout, versions, KV-cache geometry.
  metrics   counters, gauges, latency histograms (--prometheus: the Prometheus text).
  abort     --id ID: end a request of another connection (another process): the generate must have given
            --abort-key KEY, and the abort gives the same key (a connection aborts its own requests freely).
  save      a `moerun serve --train` server writes a checkpoint now (<train.out>/ckpt/step-N); prints
            its path, step and weight version.
  keygen    --keys-dir DIR --name NAME: write DIR/NAME.key (public) and DIR/NAME.key_secret (private) for
            CurveZMQ; no server needed.

A server with CurveZMQ (serve.curve_secret_key_file) needs --curve-server-key (its NAME.key) and, to be
admitted, --curve-secret-key (this client's NAME.key_secret, whose NAME.key is in the server's
serve.curve_authorized_dir). A client the server does not list gets no reply (the command times out).

examples:
  moerun client generate --connect tcp://127.0.0.1:5555 --prompt "Hello" --max-tokens 32 --stream
  moerun client metrics --connect tcp://127.0.0.1:5555 --prometheus
  moerun client keygen --keys-dir keys --name alice
  moerun client health --connect tcp://10.0.0.5:5555 --curve-server-key keys/server.key \
      --curve-secret-key keys/alice.key_secret"""


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("generate", "health", "info", "metrics", "abort", "save", "keygen"))
    parser.add_argument("--connect", default="tcp://127.0.0.1:5555", help="server address")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply")
    parser.add_argument("--json", action="store_true", help="print raw reply maps as JSON lines")
    parser.add_argument("--prompt", help="prompt text (needs a tokenizer on the server)")
    parser.add_argument("--prompt-ids", type=_ints, help="prompt token ids, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop-ids", type=_ints, default=[])
    parser.add_argument("--logprobs", type=int, default=0)
    parser.add_argument("--priority", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    parser.add_argument("--id", help="request id (generate: optional; abort: required)")
    parser.add_argument("--prometheus", action="store_true", help="metrics: print the Prometheus text")
    parser.add_argument("--abort-key", help="generate: a secret that lets another connection abort this request; "
                        "abort: that secret")
    parser.add_argument("--curve-server-key", metavar="FILE", help="the server's CurveZMQ public key (NAME.key)")
    parser.add_argument("--curve-secret-key", metavar="FILE",
                        help="this client's CurveZMQ key pair (NAME.key_secret)")
    parser.add_argument("--keys-dir", metavar="DIR", help="keygen: where to write the key files")
    parser.add_argument("--name", help="keygen: the key files' name")


def run(args: argparse.Namespace) -> int:
    from runtime.client import Client, ServerError
    from runtime.serve.curve import CurveError

    if args.action == "keygen":
        return _keygen(args)
    if args.curve_secret_key and not args.curve_server_key:
        raise SystemExit("moerun client: --curve-secret-key needs --curve-server-key (the server's NAME.key)")
    try:
        with Client(args.connect, timeout=args.timeout, curve_server_key_file=args.curve_server_key,
                    curve_secret_key_file=args.curve_secret_key) as c:
            return _run(c, args)
    except CurveError as e:
        raise SystemExit(f"moerun client: {e}") from None
    except ServerError as e:
        why = f"server error {e.code}: {e.message}"
    except TimeoutError as e:
        why = f"{e} (is a server running at {args.connect}?)"
    print(f"moerun client: {why}", file=sys.stderr)
    return 1


def _keygen(args: argparse.Namespace) -> int:
    from runtime.serve.curve import keygen

    if not args.keys_dir or not args.name:
        raise SystemExit("moerun client keygen: --keys-dir and --name are required")
    public, secret = keygen(args.keys_dir, args.name)
    print(f"public key (give it to the other side): {public}\nkey pair (keep it private): {secret}")
    return 0


def _out(args: argparse.Namespace, reply: dict) -> None:
    print(json.dumps(reply) if args.json else reply, flush=True)


def _run(c, args: argparse.Namespace) -> int:
    if args.action in ("health", "info", "save"):
        reply = c.request(args.action)
        print(json.dumps(reply, indent=None if args.json else 2), flush=True)
        return 0 if args.action == "info" or reply.get("ok") else 1
    if args.action == "metrics":
        reply = c.metrics()
        print(reply["prometheus"] if args.prometheus else json.dumps(reply["metrics"], indent=2), end="\n",
              flush=True)
        return 0
    if args.action == "abort":
        if not args.id:
            raise SystemExit("moerun client abort: --id is required")
        c.abort(args.id, args.abort_key)
        reply = c.recv(args.id)
        _out(args, reply)
        if reply.get("op") == "error":
            print(f"moerun client: server error {reply['code']}: {reply['message']}", file=sys.stderr)
            return 1
        return 0
    if (args.prompt is None) == (args.prompt_ids is None):
        raise SystemExit("moerun client generate: give exactly one of --prompt or --prompt-ids")
    params = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop_ids=args.stop_ids, logprobs=args.logprobs, priority=args.priority,
                  ignore_eos=args.ignore_eos)
    if args.abort_key:
        params["abort_key"] = args.abort_key
    if not args.stream:
        done = c.generate(args.prompt, args.prompt_ids, **params)
        if args.json:
            _out(args, done)
        else:
            print(done.get("text", done["ids"]), flush=True)
            print(f"[{done['finish_reason']}; {done['usage']}]", file=sys.stderr)
        return 0
    for msg in c.stream(args.prompt, args.prompt_ids, request_id=args.id, **params):
        if args.json:
            _out(args, msg)
        elif msg["op"] == "token":
            sys.stdout.write(msg["text"] if "text" in msg else " ".join(map(str, msg["ids"])) + " ")
            sys.stdout.flush()
        else:
            print(f"\n[{msg['finish_reason']}; {msg['usage']}]", file=sys.stderr)
    return 0
