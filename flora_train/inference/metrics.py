"""The server's Prometheus metrics (``/metrics``), in a registry of its own per app: requests by
status, tokens in and out, batch occupancy, queue depth, time to first token and inter-token
latency, and the adapter cache's hits, misses and evictions (read from the cache when scraped)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _CacheCollector:
    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        for name, value in (("hits", s.hits), ("misses", s.misses), ("evictions", s.evictions),
                            ("prefetched", s.prefetched)):
            yield CounterMetricFamily(f"flora_adapter_cache_{name}", f"adapter cache {name}", value=value)
        yield GaugeMetricFamily("flora_adapter_cache_resident", "adapters on the device", value=s.resident)
        yield GaugeMetricFamily("flora_adapter_cache_capacity", "adapters the device cache holds", value=s.capacity)


class ServeMetrics:
    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int], cache_stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flora_requests", "requests answered, by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("flora_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("flora_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("flora_time_to_first_token_seconds", "submission to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("flora_inter_token_latency_seconds", "between a request's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.occupancy = Histogram("flora_batch_occupancy", "sequences in a decode step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        Gauge("flora_queue_depth", "requests waiting to start", registry=r).set_function(queue_depth)
        Gauge("flora_running_requests", "requests prefilling or decoding", registry=r).set_function(running)
        r.register(_CacheCollector(cache_stats))

    # the engine's observer interface (called from its thread; prometheus-client is thread-safe)
    def on_step(self, batch: int) -> None:
        self.occupancy.observe(batch)

    def on_token(self, seconds: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(seconds)

    def on_finish(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServeMetrics"]
