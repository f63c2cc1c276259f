"""Serving metrics: counters, gauges and latency histograms, as a map and as Prometheus text."""

from __future__ import annotations

import bisect

__all__ = ["Histogram", "ServeMetrics"]

# Seconds; covers a sub-millisecond CPU toy model up to a slow first token on a big one.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics) with count and sum; constant memory."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.sum += value

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (None when empty)."""
        if not self.count:
            return None
        target, seen = q * self.count, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= target:
                return self.buckets[i] if i < len(self.buckets) else float("inf")
        return float("inf")

    def as_dict(self) -> dict:
        return {
            "count": self.count,
            "sum": self.sum,
            "buckets": [[b, c] for b, c in zip([*self.buckets, "+Inf"], self._cumulative())],
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
        }

    def _cumulative(self) -> list[int]:
        out, run = [], 0
        for c in self.counts:
            run += c
            out.append(run)
        return out


# Prometheus: every name with its type and help. Running totals are counters (named *_total there), also
# those the scheduler and the training work publish among the gauges of the map; a gauge is never named
# *_total there (RENAMED).
HELP: dict[str, tuple[str, str]] = {
    "prompt_tokens_total": ("counter", "Prompt tokens of finished or aborted generate requests."),
    "generation_tokens_total": ("counter", "Tokens generated for generate requests."),
    "requests_total": ("counter", "Generate requests accepted (health checks are counted apart)."),
    "requests_finished_total": ("counter", "Generate requests that ended by length or stop."),
    "requests_aborted_total": ("counter", "Generate requests aborted (by the client or a lost connection)."),
    "requests_failed_total": ("counter", "Generate requests ended by their own sampling failure (alone)."),
    "clients_departed_total": ("counter", "Connections that went away with requests in flight (ended)."),
    "preemptions_total": ("counter", "Running requests preempted by recompute when the KV cache ran out."),
    "prefix_cache_queries_tokens_total": ("counter", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits_tokens_total": ("counter", "Prompt tokens served from the prefix cache."),
    "recomputed_tokens_total": ("counter", "Tokens computed again after a preemption."),
    "errors_total": ("counter", "Requests answered with an error reply."),
    "steps_total": ("counter", "Engine steps (batched forwards) run."),
    "health_checks_total": ("counter", "Health checks answered (each a one-token generation, not traffic)."),
    "spec_verify_total": ("counter", "Decode steps of a request that verified speculative drafts."),
    "spec_draft_tokens_total": ("counter", "Speculative draft tokens verified."),
    "spec_accepted_tokens_total": ("counter", "Speculative draft tokens accepted."),
    "spec_acceptance_rate": ("gauge", "Accepted over verified speculative draft tokens."),
    "spec_tokens_per_step": ("gauge", "Tokens a decoding request gets per speculative step."),
    "generation_tokens_per_s": ("gauge", "Generated tokens per second of engine step time."),
    "requests_running": ("gauge", "Generate requests in the running batch."),
    "requests_waiting": ("gauge", "Generate requests waiting for a batch slot or KV pages."),
    "kv_cache_usage": ("gauge", "Fraction of KV pages held by requests."),
    "kv_pages_total": ("gauge", "KV pages in the cache (exposed as kv_pages_capacity: not a counter)."),
    "kv_pages_used": ("gauge", "KV pages in use (requests and prefix cache)."),
    "kv_pages_cached": ("gauge", "KV pages kept by the prefix cache."),
    "prefix_cache_hit_rate": ("gauge", "Prefix-cache hit tokens over looked-up prompt tokens."),
    "weight_version": ("gauge", "Version of the served weights (+1 per optimizer step)."),
    "time_to_first_token_seconds": ("histogram", "Seconds from arrival to the first generated token."),
    "inter_token_latency_seconds": ("histogram", "Seconds between consecutive tokens of a request."),
    "e2e_latency_seconds": ("histogram", "Seconds from arrival to the end of a request."),
    "train_optimizer_steps": ("counter", "Optimizer steps of the run (a resumed run continues its count)."),
    "train_job_steps": ("counter", "Optimizer steps of the configured training job run by this server."),
    "train_tokens_total": ("counter", "Tokens trained on by this server (job steps and train ops)."),
    "train_queue": ("gauge", "Training steps queued (micro-steps and optimizer steps)."),
    "train_save_failures": ("counter", "Checkpoints and metrics lines that could not be written (a full disk)."),
    "train_steps_per_s": ("gauge", "Optimizer steps per second since the server started."),
    "train_loss": ("gauge", "Cross-entropy of the last training micro-step."),
}
RENAMED = {"kv_pages_total": "kv_pages_capacity"}
for _kind in ("serve", "train_micro", "train_bwd", "optim"):
    HELP[f"scheduler_{_kind}_steps"] = ("counter", f"Scheduler steps of kind {_kind}.")
    HELP[f"scheduler_{_kind}_seconds"] = ("counter", f"Wall seconds spent in scheduler steps of kind {_kind}.")


def _number(v: float) -> str:
    v = float(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


class ServeMetrics:
    """Everything `metrics` reports. Gauges (running, waiting, KV usage) are filled in by the engine, the
    scheduler's and the training work's by the scheduler."""

    COUNTERS = (
        "prompt_tokens_total",
        "generation_tokens_total",
        "requests_total",
        "requests_finished_total",
        "requests_aborted_total",
        "requests_failed_total",
        "clients_departed_total",
        "preemptions_total",
        "prefix_cache_queries_tokens_total",
        "prefix_cache_hits_tokens_total",
        "recomputed_tokens_total",
        "errors_total",
        "steps_total",
        "health_checks_total",
        "spec_verify_total",  # speculative decoding: decode steps of a request that verified drafts
        "spec_draft_tokens_total",  # drafts verified
        "spec_accepted_tokens_total",  # drafts accepted
    )
    HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_latency_seconds")

    def __init__(self) -> None:
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.gauges: dict[str, float] = {
            "requests_running": 0, "requests_waiting": 0, "kv_cache_usage": 0.0,
            "kv_pages_total": 0, "kv_pages_used": 0, "kv_pages_cached": 0,
            "generation_tokens_per_s": 0.0,  # generated tokens per second of engine step time
        }
        self.hist = {name: Histogram() for name in self.HISTOGRAMS}

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def observe(self, name: str, value: float) -> None:
        self.hist[name].observe(value)

    def prefix_hit_rate(self) -> float:
        q = self.counters["prefix_cache_queries_tokens_total"]
        return self.counters["prefix_cache_hits_tokens_total"] / q if q else 0.0

    def as_dict(self) -> dict:
        return {
            **self.counters,
            **self.gauges,
            "prefix_cache_hit_rate": self.prefix_hit_rate(),
            **{name: h.as_dict() for name, h in self.hist.items()},
        }

    def prometheus(self, prefix: str = "moerun_") -> str:
        """The Prometheus text exposition (format 0.0.4): `# HELP` and `# TYPE` for every family, running
        totals as counters named *_total. Safe to call from another thread than the one that updates the
        metrics: it reads copies (a dict copy is atomic under the GIL), and each histogram's count is its
        buckets' total."""
        values = {**dict(self.counters), **dict(self.gauges), "prefix_cache_hit_rate": self.prefix_hit_rate()}
        lines = []
        for name, v in values.items():
            if not isinstance(v, (int, float)):
                continue
            kind, text = HELP.get(name, ("gauge", f"{name.replace('_', ' ')}."))
            full = prefix + RENAMED.get(name, name)
            if kind == "counter" and not full.endswith("_total"):
                full += "_total"
            lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}", f"{full} {_number(v)}"]
        for name, h in self.hist.items():
            counts, total = list(h.counts), h.sum
            full = prefix + name
            lines += [f"# HELP {full} {HELP[name][1]}", f"# TYPE {full} histogram"]
            run = 0
            for b, c in zip([*h.buckets, "+Inf"], counts):
                run += c
                lines.append(f'{full}_bucket{{le="{b}"}} {run}')
            lines += [f"{full}_sum {_number(total)}", f"{full}_count {run}"]
        return "\n".join(lines) + "\n"
