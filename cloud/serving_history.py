"""What the fleet served, over time: the dashboard's edge-vs-cloud split and latency.

Agents report router counters "since the last report" about once a second
(`edge/router.py` stats). This keeps a short, bounded history of them in memory,
fleet-wide per time bucket, and per model version for latency histograms. It is a
view for people, not a metrics store: each control-plane replica sees the reports
it handled, it starts empty after a restart, and Prometheus (the agents' and the
fallback's `/metrics`) is where long history belongs.

Reports are untrusted: `cloud.telemetry.telemetry_increments` has already bounded
the counters; reasons and histogram counts are bounded again here.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from cloud.telemetry import MAX_COUNTER
from common.errors import InvalidInputError
from common.names import check_name

# Upper bounds (ms) of the agents' latency histogram buckets; the last is +Inf.
# NOTE: keep in step with edge.router.LATENCY_BUCKETS_MS (edge/ cannot be imported here).
LATENCY_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
MAX_REASONS = 16  # distinct escalation reasons kept per bucket (a device names them)
# The router's own reasons always count: one device naming 16 made-up reasons first in
# each bucket must not hide the fleet's real escalations.
# NOTE: keep in step with edge.router (edge/ cannot be imported here).
ROUTER_REASONS = frozenset({"forced", "no_local_model", "heavy", "busy", "uncertain"})
MAX_SERIES = 64  # model versions with a latency histogram
# Devices with per-device figures: a telemetry topic names any id the broker lets through
# (every id, on a broker without an ACL), and a report for an unknown one still lands here.
MAX_DEVICES = 100_000


@dataclass
class Bucket:
    """Fleet-wide counts for one time bucket."""

    start: float
    local: float = 0
    cloud: float = 0
    degraded: float = 0
    reasons: Counter[str] = field(default_factory=Counter)


def _count(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) and 0 <= value <= MAX_COUNTER else 0.0


def _is_name(value: object) -> bool:
    try:
        check_name(value, "escalation reason")
    except InvalidInputError:
        return False
    return True


def _histogram(summary: object) -> list[float] | None:
    """The bucket counts of one latency summary, or None when absent or malformed."""
    hist = summary.get("hist") if isinstance(summary, dict) else None
    if not isinstance(hist, list) or len(hist) != len(LATENCY_BUCKETS_MS) + 1:
        return None
    return [_count(c) for c in hist]


class ServingHistory:
    """Bounded in-memory history: ``bucket_s``-second buckets over ``keep_s`` seconds."""

    def __init__(self, bucket_s: float = 5.0, keep_s: float = 3600.0) -> None:
        self.bucket_s = bucket_s
        self._buckets: deque[Bucket] = deque(maxlen=max(1, int(keep_s / bucket_s)))
        # (where, "model:version") -> histogram counts since start; where is edge|cloud
        self._latency: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self.reasons_by_device: dict[str, Counter[str]] = {}
        # device -> its latest local p95 (ms): a quiet period's report has none
        self.local_p95_by_device: dict[str, float] = {}

    def _bucket(self, now: float) -> Bucket:
        start = now - now % self.bucket_s
        if not self._buckets or self._buckets[-1].start < start:
            self._buckets.append(Bucket(start))
        return self._buckets[-1]

    def add(
        self, device_id: str, report: dict[str, Any], models: list[tuple[str, dict[str, Any]]]
    ) -> None:
        """Count one telemetry report (already accepted by the fleet monitor).

        ``models``: (``name:version``, that model's router stats) for the histograms.
        """
        router = report.get("router")
        if not isinstance(router, dict):
            return
        bucket = self._bucket(time.time())
        bucket.local += _count(router.get("served_local"))
        bucket.cloud += _count(router.get("served_cloud"))
        bucket.degraded += _count(router.get("degraded"))
        escalated = router.get("escalated")
        known = device_id in self.reasons_by_device or len(self.reasons_by_device) < MAX_DEVICES
        device_reasons = (
            self.reasons_by_device.setdefault(device_id, Counter()) if known else Counter()
        )
        for reason, n in escalated.items() if isinstance(escalated, dict) else ():
            room = reason in bucket.reasons or len(bucket.reasons) < MAX_REASONS
            if _is_name(reason) and (room or reason in ROUTER_REASONS):
                bucket.reasons[reason] += _count(n)
                if reason in device_reasons or len(device_reasons) < MAX_REASONS:
                    device_reasons[reason] += _count(n)
        latency = router.get("latency_ms")
        local = latency.get("local") if isinstance(latency, dict) else None
        p95 = local.get("p95_ms") if isinstance(local, dict) else None
        if _count(p95) > 0 and known:
            self.local_p95_by_device[device_id] = _count(p95)
        for model, stats in models:
            by_where = stats.get("latency_ms") if isinstance(stats, dict) else None
            for where, key in (("edge", "local"), ("cloud", "cloud")):
                counts = _histogram(by_where.get(key)) if isinstance(by_where, dict) else None
                if counts is not None:
                    self._add_latency((where, model), counts)

    def _add_latency(self, key: tuple[str, str], counts: list[float]) -> None:
        series = self._latency.get(key)
        if series is None:
            if len(self._latency) >= MAX_SERIES:
                self._latency.popitem(last=False)  # the oldest series goes first
            series = self._latency[key] = [0.0] * len(counts)
        self._latency.move_to_end(key)
        for i, n in enumerate(counts):
            series[i] += n

    def to_dict(self) -> dict[str, Any]:
        """The dashboard's serving view: a time series and latency histograms."""
        buckets = list(self._buckets)
        reasons = sorted({r for b in buckets for r in b.reasons})
        return {
            "bucket_s": self.bucket_s,
            "series": {
                "t": [b.start for b in buckets],
                "edge": [b.local for b in buckets],
                "cloud": [b.cloud for b in buckets],
                "degraded": [b.degraded for b in buckets],
            },
            "escalation_reasons": {r: sum(b.reasons[r] for b in buckets) for r in reasons},
            "latency_buckets_ms": list(LATENCY_BUCKETS_MS),
            "latency": [
                {"where": where, "model": model, "counts": counts}
                for (where, model), counts in self._latency.items()
            ],
        }
