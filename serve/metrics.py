"""The server's Prometheus metrics, in a registry of their own (``GET /metrics``)."""

from __future__ import annotations


class Metrics:
    """Counters and histograms the routes and the engine update; names are the ``/metrics`` contract."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgetune_requests", "Requests by route, adapter and status",
                                ["route", "adapter", "status"], registry=r)
        self.latency = Histogram("edgetune_request_latency_seconds", "Request latency", ["route"], registry=r)
        self.ttft = Histogram("edgetune_time_to_first_token_seconds", "Time to first token", ["route"], registry=r)
        self.tokens = Counter("edgetune_generated_tokens", "Generated tokens", ["adapter"], registry=r)
        self.queue = Gauge("edgetune_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.loaded = Gauge("edgetune_loaded_adapters", "Adapters in memory", registry=r)
        self.load_time = Histogram("edgetune_adapter_load_seconds", "Adapter load time", registry=r)
        self.batch = Histogram("edgetune_decode_batch_size", "Requests decoded together per step", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.prefix_hit = Gauge("edgetune_prefix_cache_hit_ratio", "Share of prompt tokens served from the prefix "
                                "cache instead of prefilled (ONNX backend)", registry=r)
        self.prefix_bytes = Gauge("edgetune_prefix_cache_bytes", "Memory held by cached prompt blocks (ONNX backend)",
                                  registry=r)

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
