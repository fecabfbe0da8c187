"""Telemetry from devices: what a report may add to the fleet's totals, and how often.

Both are pure decisions (a report in, numbers or a yes/no out), tested with
tables; the fleet monitor feeds them and acts on the answer. A device's report
is untrusted input: a forged "a billion requests" must not count, and a flood
must not fill the database.
"""

from __future__ import annotations

import math
import time
from typing import Any

from common.errors import InvalidInputError

# Router counters that the fleet view adds up across telemetry reports.
TOTALLED = ("requests", "served_local", "served_cloud", "degraded", "cloud_errors")
# The most one report may add to one counter: a device serving more than this between
# two reports is not plausible, and a forged "a billion requests" must not count.
MAX_COUNTER = 1e6


def _counter(value: object, what: str) -> float:
    """A telemetry figure: a finite number in [0, MAX_COUNTER], else InvalidInputError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_COUNTER
    ):
        raise InvalidInputError(f"telemetry {what} must be a number in [0, {MAX_COUNTER:g}]")
    return value


def telemetry_increments(doc: dict[str, Any]) -> dict[str, float]:
    """What one report adds to a device's running totals; InvalidInputError if implausible.

    A pure function of the report, so the rules are tested with tables of cases.
    """
    router = doc.get("router") or {}
    escalated = router.get("escalated") if isinstance(router, dict) else None
    if not isinstance(router, dict) or not isinstance(escalated or {}, dict):
        raise InvalidInputError("telemetry 'router' and 'router.escalated' must be objects")
    out = {k: _counter(router[k], k) for k in TOTALLED if router.get(k) is not None}
    if escalated:
        reasons = [_counter(v, f"escalated.{k}") for k, v in escalated.items()]
        out["escalated"] = _counter(sum(reasons), "escalated (sum)")
    return out


class TelemetryLimiter:
    """Accept at most one telemetry report per device per ``interval_s`` (a token bucket).

    A small burst is allowed so that a report arriving a little early (jitter, an
    outbox flushed after an outage) is not lost; the long-run rate stays bounded.
    """

    MAX_DEVICES = 100_000  # NOTE: bounds the table even under a flood of made-up ids

    def __init__(self, interval_s: float = 1.0, burst: float = 3.0) -> None:
        self.interval_s = interval_s
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)

    def allow(self, device_id: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.interval_s <= 0:
            return True
        tokens, at = self._buckets.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) / self.interval_s)
        if len(self._buckets) >= self.MAX_DEVICES and device_id not in self._buckets:
            self._buckets.clear()  # crude, but bounded; honest devices refill at once
        if tokens < 1:
            self._buckets[device_id] = (tokens, now)
            return False
        self._buckets[device_id] = (tokens - 1, now)
        return True


def version_reports(
    doc: dict[str, Any], models: list[dict[str, Any]]
) -> list[tuple[str, str, dict[str, float]]]:
    """(model, version, figures) a report gives, per model version served locally.

    The figures are what the rollout gates compare between versions: requests,
    escalated, errors, local_count and p95_sum (the period's local p95 times its
    local requests, so that a sum over reports gives a request-weighted mean).
    ``models`` is the device's status, for a single-model report that names no model.
    Reports without a local version (nothing served locally) give nothing.
    """
    per_model = doc.get("models")
    if isinstance(per_model, dict):  # a multi-model agent: {name: router stats}
        items = list(per_model.items())
    else:
        router = doc.get("router")
        name = router.get("model") if isinstance(router, dict) else None
        name = name if name is not None else doc.get("model")
        if name is None and len(models) == 1:
            name = models[0].get("name")
        items = [(name, router)]
    out = []
    for name, router in items:
        if not isinstance(name, str) or not isinstance(router, dict):
            continue
        version = router.get("local_version")
        if not isinstance(version, str) or not version:
            continue
        increments = telemetry_increments({"router": router})
        latency = router.get("latency_ms")
        local = latency.get("local") if isinstance(latency, dict) else None
        local = local if isinstance(local, dict) else {}
        count = _counter(local.get("count", 0), "latency_ms.local.count")
        p95 = _counter(local.get("p95_ms", 0), "latency_ms.local.p95_ms") if count else 0.0
        figures = {
            "requests": increments.get("requests", 0.0),
            "escalated": increments.get("escalated", 0.0),
            "errors": _counter(router.get("errors", 0), "errors"),
            "local_count": count,
            "p95_sum": p95 * count,
        }
        out.append((name, version, figures))
    return out
