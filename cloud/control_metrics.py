"""The control plane's Prometheus metrics: fleet and rollouts by state, MQTT traffic, API latency.

Its own ``CollectorRegistry`` (never prometheus_client's global one), so two control
planes in one process (tests) and the fallback's metrics never mix. Fleet and rollout
counts are read from the database at scrape time, so every replica reports the same
figures and nothing has to be kept in step with the registry. Labels come from bounded
sets only (route patterns, topic kinds, states the code writes), so no caller can grow
a series.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from cloud.registry import DEVICE_STATES, Registry
from common import topics
from common.mqtt import MqttLink

# Reported at 0 when none is in them; states written by the code (never by a caller)
# and not listed here are reported too, under their own name.
ROLLOUT_STATES = ("running", "succeeded", "partial", "failed", "timed_out", "aborted")
# API latency buckets (seconds): most routes answer in milliseconds, publishes take longer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class StateCollector(Collector):
    """``fogline_control_devices{state}`` and ``fogline_control_rollouts{state}``, at scrape."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._registry.state_counts()
        for table, known, help_text in (
            ("devices", (*DEVICE_STATES, "unknown"), "devices known to the control plane"),
            ("rollouts", ROLLOUT_STATES, "rollouts (the database keeps every one)"),
        ):
            family = GaugeMetricFamily(
                f"fogline_control_{table}", f"{help_text}, by state", labels=["state"]
            )
            found = counts.get(table, {})
            for state in dict.fromkeys([*known, *found]):
                family.add_metric([state], found.get(state, 0))
            yield family


class ControlMetrics:
    """The metric objects of one control plane, and the hooks that feed them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.mqtt = Counter(
            "fogline_control_mqtt_messages",
            "MQTT messages received (in) and published (out), by topic kind",
            ["direction", "kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fogline_control_api_request_duration_seconds",
            "time to answer an API request, by route pattern, method and status class",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._state: StateCollector | None = None

    def watch(self, registry: Registry, link: MqttLink) -> None:
        """Count ``link``'s messages and report ``registry``'s states from now on."""
        link.observers.append(self.count_message)
        if self._state is None:
            self._state = StateCollector(registry)
            self.registry.register(self._state)

    def count_message(self, direction: str, topic: str) -> None:
        self.mqtt.labels(direction, topic_kind(topic)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def topic_kind(topic: str) -> str:
    """``status``, ``chunks``, ... for a Fogline topic; ``other`` for anything else."""
    try:
        return topics.parse(topic).kind
    except ValueError:
        return "other"


CONTROL_METRICS = web.AppKey("fogline.control_metrics", ControlMetrics)


@web.middleware
async def latency_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Time every routed request by its pattern (``/api/rollouts/{id}``, never the id)."""
    resource = request.match_info.route.resource
    if resource is None:  # no route matched: one label for every 404, whatever the path
        return await handler(request)
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        request.app[CONTROL_METRICS].latency.labels(
            resource.canonical, request.method, f"{status // 100}xx"
        ).observe(time.perf_counter() - start)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text format (the state counts query the database)."""
    body = await asyncio.to_thread(request.app[CONTROL_METRICS].render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
