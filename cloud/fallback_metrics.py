"""The fallback's serving figures for the dashboard, read from its Prometheus `/metrics`.

The control plane scrapes each configured fallback (``--fallback-metrics URL``) every
few seconds and keeps, per model version, what the operator wants next to the edge's
figures: requests, batching (inferences per execution), queue time against compute
time, and the batch-size histogram. It reads the Triton-named families the fallback
exports (`nv_inference_*`), whether they are counters of microseconds (as Triton's
are) or histograms (``_sum``/``_count``).

A fallback is a separate process that may be broken or hostile: an answer is read up
to ``MAX_BYTES`` under a timeout, and a failed scrape is reported, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from cloud.package_cache import read_bounded
from common.errors import CloudUnavailableError

logger = logging.getLogger(__name__)

MAX_BYTES = 1024**2
MAX_SERIES = 64  # model versions tracked per fallback
MAX_BUCKETS = 64  # batch-size histogram buckets per model version (the page draws each)
COUNTERS = {
    "nv_inference_request_success": "success",
    "nv_inference_request_failure": "failure",
    "nv_inference_count": "inferences",
    "nv_inference_exec_count": "executions",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_compute_infer_duration_us": "compute_us",
}


def _finite(value: float) -> float:
    return value if math.isfinite(value) and value >= 0 else 0.0


def _ratio(total: float, count: float) -> float | None:
    """``total / count``, or None: a hostile 1e300 / 1e-300 is Infinity, which no JSON holds."""
    value = total / count if count else math.inf
    return value if math.isfinite(value) else None


def parse_metrics(text: str) -> dict[str, dict[str, Any]]:
    """Per ``model:version``: the totals above, plus ``batch_size`` histogram buckets.

    A family the fallback does not export is simply absent; malformed text raises
    ValueError (the scraper reports it).
    """
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name
        for sample in family.samples:
            labels = sample.labels
            key = f"{labels.get('model', '?')}:{labels.get('version', '?')}"
            if key not in out and len(out) >= MAX_SERIES:
                continue
            if name in COUNTERS:
                field_name = COUNTERS[name]
                # A counter's sample is `<name>_total` or `<name>` (Triton's
                # `nv_inference_count` itself ends in `_count`); a histogram's, `_sum`.
                histogram = family.type in ("histogram", "summary")
                if sample.name.endswith("_created") or (
                    histogram and not sample.name.endswith("_sum")
                ):
                    continue
                entry = out.setdefault(key, {})
                entry[field_name] = _finite(entry.get(field_name, 0.0) + _finite(sample.value))
            elif "batch_size" in name and sample.name.endswith("_bucket"):
                entry = out.setdefault(key, {})
                hist = entry.setdefault("batch_size", {})
                le = labels.get("le", "+Inf")
                if le in hist or len(hist) < MAX_BUCKETS:
                    hist[le] = _finite(sample.value)
    for entry in out.values():
        executions = entry.get("executions") or 0
        requests = entry.get("success") or entry.get("inferences") or 0
        entry["mean_batch"] = _ratio(entry.get("inferences", 0), executions)
        for what in ("queue_us", "compute_us"):
            total = entry.get(what)
            entry[f"{what}_per_request"] = _ratio(total, requests) if total else None
    return out


@dataclass
class FallbackScrape:
    url: str
    ok: bool = False
    error: str | None = None
    at: float | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (t, model, queue_us per request, compute_us per request) over the recent scrapes
    history: deque[tuple[float, str, float | None, float | None]] = field(
        default_factory=lambda: deque(maxlen=720)
    )

    def update(self, models: dict[str, dict[str, Any]], now: float) -> None:
        """Record a scrape; the history holds each interval's own per-request times."""
        for key, entry in models.items():
            before = self.models.get(key, {})
            served = (entry.get("success") or 0) - (before.get("success") or 0)
            per = [
                _ratio((entry.get(w) or 0) - (before.get(w) or 0), served) if served > 0 else None
                for w in ("queue_us", "compute_us")
            ]
            self.history.append((now, key, per[0], per[1]))
        self.models, self.ok, self.error, self.at = models, True, None, now

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "ok": self.ok,
            "error": self.error,
            "scraped_at": self.at,
            "models": self.models,
            "history": [
                {"t": t, "model": m, "queue_us": q, "compute_us": c} for t, m, q, c in self.history
            ],
        }


class FallbackScraper:
    """Scrapes every configured fallback's `/metrics` each ``interval_s`` seconds."""

    def __init__(self, urls: list[str], interval_s: float = 5.0) -> None:
        self.scrapes = [FallbackScrape(url.rstrip("/")) for url in urls]
        self.interval_s = interval_s

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FallbackScraper]:
        if not self.scrapes:
            yield self
            return
        timeout = aiohttp.ClientTimeout(total=min(5.0, self.interval_s))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            task = asyncio.create_task(self._loop(session), name="fallback-scraper")
            try:
                yield self
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.gather(*(self.scrape(session, s) for s in self.scrapes))
            await asyncio.sleep(self.interval_s)

    @staticmethod
    async def scrape(session: aiohttp.ClientSession, target: FallbackScrape) -> None:
        try:
            async with session.get(url := f"{target.url}/metrics") as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await read_bounded(resp, url, MAX_BYTES)
            models = await asyncio.to_thread(parse_metrics, body.decode("utf-8", "replace"))
        except (aiohttp.ClientError, TimeoutError, ValueError, CloudUnavailableError) as exc:
            target.ok, target.error = False, f"{type(exc).__name__}: {exc}"[:200]
            logger.debug("scrape of %s failed: %s", target.url, target.error)
            return
        target.update(models, time.time())

    def to_dict(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.scrapes]
