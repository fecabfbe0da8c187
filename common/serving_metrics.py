"""Prometheus metrics of a V2 server, through ``prometheus_client`` (one registry per server).

Names follow Triton's where the meaning matches, so its dashboards carry over
(``prometheus_client`` adds ``_total`` to every counter, as OpenMetrics asks):
``nv_inference_request_success|failure`` count requests, ``nv_inference_count``
counts inferences (rows) and ``nv_inference_exec_count`` model executions, so
``count / exec_count`` is the batching factor. Triton's cumulative
``*_duration_us`` counters are kept, and latencies are also histograms
(``fogline_*_seconds``) so the quantiles of several replicas aggregate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN_MODEL = "_unknown"  # one label for every name that is not served (bounded cardinality)

# Request latency from 100 us to 30 s; batch sizes as powers of two up to 1024.
_LATENCY_BUCKETS = (
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
)  # fmt: skip
_BATCH_BUCKETS = tuple(float(2**i) for i in range(11))
_MV = ("model", "version")


class ServingMetrics:
    """Every metric one server exposes; ``render()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._collectors: dict[str, Collector] = {}
        r = self.registry
        self.success = Counter(
            "nv_inference_request_success", "Successful inference requests.", _MV, registry=r
        )
        self.failure = Counter(
            "nv_inference_request_failure",
            "Failed inference requests, by reason (the HTTP status, or 'deadline').",
            (*_MV, "reason"),
            registry=r,
        )
        self.inferences = Counter(
            "nv_inference_count", "Inferences performed (rows, batched or not).", _MV, registry=r
        )
        self.executions = Counter(
            "nv_inference_exec_count", "Model executions (one per batch).", _MV, registry=r
        )
        self.request_us = Counter(
            "nv_inference_request_duration_us",
            "Cumulative end-to-end inference request time, microseconds.",
            _MV,
            registry=r,
        )
        self.queue_us = Counter(
            "nv_inference_queue_duration_us",
            "Cumulative time requests waited in the batching queue, microseconds.",
            _MV,
            registry=r,
        )
        self.compute_us = Counter(
            "nv_inference_compute_infer_duration_us",
            "Cumulative model execution time, microseconds (a batch's time counts per request).",
            _MV,
            registry=r,
        )
        self.request_seconds = Histogram(
            "fogline_inference_request_seconds",
            "Inference request latency (HTTP in to answer out).",
            _MV,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "fogline_inference_queue_seconds",
            "Time a request waited in the batching queue.",
            _MV,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "fogline_inference_compute_seconds",
            "Model execution time of the batch a request ran in.",
            _MV,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "fogline_batch_size",
            "Rows per model execution.",
            _MV,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.served = Counter(
            "fogline_requests_served",
            "Answered inference requests by who served them (edge|cloud) and escalation reason.",
            ("model", "served_by", "reason"),
            registry=r,
        )
        # Labelled children by (metric, labels): bounded, as the labels are (served
        # names, one shared label for every other name, statuses).
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: ``labels()`` takes a lock and checks
        its arguments each call, a measurable share of a small model's request."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(
        self, model: str, version: str, status: int, seconds: float, reason: str | None = None
    ) -> None:
        """One HTTP infer request: outcome (``reason`` defaults to the status) and latency."""
        child = self._child
        if status < 400:
            child(self.success, model, version).inc()
        else:
            child(self.failure, model, version, reason or str(status)).inc()
        child(self.request_us, model, version).inc(seconds * 1e6)
        child(self.request_seconds, model, version).observe(seconds)

    def observe_execution(
        self, model: str, version: str, rows: int, compute_s: float, queue_s: Iterable[float]
    ) -> None:
        """One model execution of ``rows`` rows for requests that waited ``queue_s``."""
        waits = list(queue_s)
        child = self._child
        child(self.executions, model, version).inc()
        child(self.inferences, model, version).inc(rows)
        child(self.batch_size, model, version).observe(rows)
        if not waits:
            return
        child(self.queue_us, model, version).inc(sum(waits) * 1e6)
        # A batch's compute time counts once per request in it.
        child(self.compute_us, model, version).inc(compute_s * 1e6 * len(waits))
        queue_seconds = child(self.queue_seconds, model, version)
        compute_seconds = child(self.compute_seconds, model, version)
        for wait in waits:
            queue_seconds.observe(wait)
            compute_seconds.observe(compute_s)

    def observe_served(self, model: str, served_by: str, reason: str) -> None:
        self.served.labels(model, served_by, reason).inc()

    def add_collector(self, key: str, collect: Callable[[], Iterable[Metric]]) -> None:
        """Metrics computed at scrape time (gauges read from live state); a second
        collector under the same ``key`` replaces the first (one V2 app per dataplane)."""
        old = self._collectors.pop(key, None)
        if old is not None:
            self.registry.unregister(old)
        self._collectors[key] = _Callback(collect)
        self.registry.register(self._collectors[key])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()

    def describe(self) -> Iterator[Metric]:
        return iter(())


def gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def loaded_versions(pairs: Iterable[tuple[str, str]]) -> GaugeMetricFamily:
    """``fogline_model_loaded{model,version} 1`` for each version being served."""
    family = GaugeMetricFamily(
        "fogline_model_loaded", "Model versions loaded and serving (1 each).", labels=list(_MV)
    )
    for model, version in sorted(set(pairs)):
        family.add_metric([model, version], 1)
    return family


def parse(text: str) -> dict[str, Any]:
    """Exposition text -> {sample name: [(labels, value), ...]}, via prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples
