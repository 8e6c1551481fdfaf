"""Prometheus metrics for the server: request counters and latency histograms kept here, engine gauges read from
``AsyncEngine.stats()`` (the engine's state after its latest step), rendered in the text exposition format."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence

from codegen2.engine.engine import EngineStats


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help, self.buckets = name, help, list(buckets)
        self.counts, self.sum = [0] * (len(self.buckets) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def render(self) -> list[str]:
        lines, total = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"], 0
        for le, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            total += count
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        return lines + [f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]


def _metric(name: str, kind: str, help: str, samples: dict[str, float]) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", *(f"{name}{k} {v}" for k, v in samples.items())]


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, HTTP status) -> responses
        self.tokens = Counter()  # "prompt" / "generation" -> tokens
        buckets = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
        self.latency = Histogram("codegen2_request_duration_seconds", "Generation time per request.", buckets)
        self.ttft = Histogram("codegen2_time_to_first_token_seconds", "Time to the first token.", buckets)

    def render(self, stats: EngineStats | None) -> str:
        lines = _metric("codegen2_requests_total", "counter", "HTTP responses by route and status.",
                        {f'{{route="{r}",status="{s}"}}': c for (r, s), c in sorted(self.requests.items())})
        for kind in ("prompt", "generation"):
            lines += _metric(f"codegen2_{kind}_tokens_total", "counter", f"{kind} tokens.", {"": self.tokens[kind]})
        lines += self.latency.render() + self.ttft.render()
        if stats is not None:
            gauges = {"requests_waiting": stats.waiting, "requests_running": stats.running,
                      "kv_cache_slots": stats.slots, "kv_cache_slots_used": stats.slots_used,
                      "kv_cache_usage": stats.cached_tokens / (stats.slots * stats.max_seq_len)}
            for name, value in gauges.items():
                lines += _metric(f"codegen2_{name}", "gauge", name.replace("_", " ") + ".", {"": value})
            lines += _metric("codegen2_prefix_cache_tokens_total", "counter", "prompt tokens reused from the cache.",
                             {"": stats.reused_tokens})
            lines += _metric("codegen2_draft_tokens_total", "counter", "speculative drafts proposed.",
                             {"": stats.draft_tokens})
            lines += _metric("codegen2_draft_tokens_accepted_total", "counter", "speculative drafts kept.",
                             {"": stats.accepted_draft_tokens})
        return "\n".join(lines) + "\n"
