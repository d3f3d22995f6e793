"""Prometheus metrics of one server (its own registry: several apps in one process, as in
tests, do not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from earlyexit.api import GenerationReport

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class ServerMetrics:
    def __init__(self, num_layers: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "earlyexit_requests",
            "Requests by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "earlyexit_tokens",
            "Prompt and completion tokens by method.",
            ["kind", "method"],
            registry=self.registry,
        )
        self.layers = Histogram(
            "earlyexit_layers_per_token",
            "Decoder-layer applications per decode-phase token, per request.",
            ["method"],
            buckets=tuple(range(1, num_layers + 1)) + (2 * num_layers,),
            registry=self.registry,
        )
        self.shallow = Histogram(
            "earlyexit_shallow_fraction",
            "Fraction of a request's tokens that exited early.",
            ["method"],
            buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 1),
            registry=self.registry,
        )
        self.latency = Histogram(
            "earlyexit_request_seconds",
            "Request latency from arrival to last byte, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "earlyexit_requests_in_flight", "Requests being served.", registry=self.registry
        )

    def generation(self, report: GenerationReport) -> None:
        method = report.method
        self.tokens.labels("prompt", method).inc(report.prompt_tokens)
        self.tokens.labels("completion", method).inc(report.completion_tokens)
        self.layers.labels(method).observe(report.avg_layers)
        self.shallow.labels(method).observe(report.shallow_fraction)

    def render(self) -> bytes:
        return generate_latest(self.registry)
