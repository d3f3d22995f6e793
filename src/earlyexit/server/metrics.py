"""Prometheus metrics of one server (its own registry: several apps in one process, as in
tests, do not share counters)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from earlyexit.runtime.results import GenerationReport
from earlyexit.runtime.scheduler import SchedulerStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class ServerMetrics:
    def __init__(
        self, num_layers: int, scheduler: Callable[[], SchedulerStats] | None = None
    ) -> None:
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
        self.ttft = Histogram(
            "earlyexit_time_to_first_token_seconds",
            "Arrival to first token (queue wait and prefill), by method family.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "earlyexit_queue_wait_seconds",
            "Waiting for a row of the running batch, by method family.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        if scheduler is not None:  # read at each scrape
            for name, doc, field in (
                ("earlyexit_running_rows", "Rows in the running batch.", "running"),
                ("earlyexit_queue_depth", "Requests waiting for a row.", "queued"),
                ("earlyexit_prefilling", "Requests being prefilled.", "prefilling"),
            ):
                gauge = Gauge(name, doc, registry=self.registry)
                gauge.set_function(lambda field=field: getattr(scheduler(), field))
            mean = Gauge(
                "earlyexit_mean_batch", "Mean running rows per decode pass.", registry=self.registry
            )
            mean.set_function(lambda: scheduler().mean_batch)

    def generation(self, report: GenerationReport) -> None:
        method = report.method.split(":")[0]  # the family: bounded label values
        self.ttft.labels(method).observe(report.prompt_seconds)
        self.queue_wait.labels(method).observe(report.queue_seconds)
        self.tokens.labels("prompt", method).inc(report.prompt_tokens)
        self.tokens.labels("completion", method).inc(report.completion_tokens)
        self.layers.labels(method).observe(report.avg_layers)
        self.shallow.labels(method).observe(report.shallow_fraction)

    def render(self) -> bytes:
        return generate_latest(self.registry)
