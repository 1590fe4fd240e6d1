"""Prometheus metrics of one server, in vLLM's names (prefix `rtp_jax:`) so its dashboards carry over.

Each app owns a `CollectorRegistry`: two apps in one process (tests, PD roles later) never share or
clash on metrics. The engine thread records; prometheus-client's metrics are thread-safe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"rtp_jax:{name}", doc, labels, registry=r, buckets=buckets)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"rtp_jax:{name}", doc, labels, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"rtp_jax:{name}", doc, labels, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.",
                         _LATENCY_BUCKETS).labels(model_name)
        self.itl = hist("inter_token_latency_seconds", "Time between output tokens of a sequence.",
                        _ITL_BUCKETS).labels(model_name)
        self.e2e = hist("e2e_request_latency_seconds", "Request latency, arrival to last token.",
                        _E2E_BUCKETS).labels(model_name)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens admitted.").labels(model_name)
        self.generation_tokens = counter("generation_tokens", "Tokens generated.").labels(model_name)
        self.running = gauge("num_requests_running", "Sequences in the running batch.").labels(model_name)
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.").labels(model_name)
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)."
                              ).labels(model_name)
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
                                      ).labels(model_name)
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache."
                                   ).labels(model_name)
        self._success = Counter("rtp_jax:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self._model_name = model_name
        self.rejected = counter("request_rejected", "Requests refused with 429 (queue full)."
                                ).labels(model_name)
        # The KV manager's prefix counters are cumulative totals; Counters only move by increments.
        self._last_prefix = (0, 0)

    def request_finished(self, reason: str) -> None:
        self._success.labels(self._model_name, reason).inc()

    def set_engine_state(self, running: int, waiting: int, kv_usage: float, prefix_queries: int,
                         prefix_hits: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        q0, h0 = self._last_prefix
        if prefix_queries >= q0 and prefix_hits >= h0:
            self.prefix_queries.inc(prefix_queries - q0)
            self.prefix_hits.inc(prefix_hits - h0)
        self._last_prefix = (prefix_queries, prefix_hits)

    def render(self) -> bytes:
        return generate_latest(self.registry)
