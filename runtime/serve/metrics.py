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


class ServeMetrics:
    """Everything `metrics` reports. Gauges (running, waiting, KV usage) are filled in by the engine."""

    COUNTERS = (
        "prompt_tokens_total",
        "generation_tokens_total",
        "requests_total",
        "requests_finished_total",
        "requests_aborted_total",
        "preemptions_total",
        "prefix_cache_queries_tokens_total",
        "prefix_cache_hits_tokens_total",
        "recomputed_tokens_total",
        "errors_total",
        "steps_total",
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
        lines = []
        for name, v in self.counters.items():
            lines += [f"# TYPE {prefix}{name} counter", f"{prefix}{name} {v}"]
        gauges = {**self.gauges, "prefix_cache_hit_rate": self.prefix_hit_rate()}
        for name, v in gauges.items():
            lines += [f"# TYPE {prefix}{name} gauge", f"{prefix}{name} {v}"]
        for name, h in self.hist.items():
            lines.append(f"# TYPE {prefix}{name} histogram")
            for b, c in zip([*h.buckets, "+Inf"], h._cumulative()):
                lines.append(f'{prefix}{name}_bucket{{le="{b}"}} {c}')
            lines += [f"{prefix}{name}_sum {h.sum}", f"{prefix}{name}_count {h.count}"]
        return "\n".join(lines) + "\n"
