"""The dashboard: one static page (vendored uPlot, no CDN) and the views it reads.

The page is public (it holds no data); every view behind it is an API route that
needs a viewer token, and the page's buttons call the same operator routes as the
CLI. Views are computed here from what the registry, the fleet's telemetry
history and the fallback scrapes hold, as pure functions tested with tables.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from cloud.fallback_metrics import FallbackScraper
from cloud.registry import Registry
from cloud.serving_history import ServingHistory
from common.errors import NotFoundError

STATIC = Path(__file__).with_name("static")
PAGE = STATIC / "dashboard.html"
# Served by name from this table only: the URL never becomes a path.
VENDOR = {
    "uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", "text/javascript"),
    "uPlot.min.css": ("vendor/uplot/uPlot.min.css", "text/css"),
    "dashboard.js": ("dashboard.js", "text/javascript"),
}


@dataclass(frozen=True)
class Sources:
    """What the views read: the registry, the telemetry history, the fallback scrapes."""

    registry: Registry
    history: ServingHistory
    scraper: FallbackScraper
    stale_after_s: float


SOURCES = web.AppKey("dashboard_sources", Sources)


def _labels(status: dict[str, Any]) -> dict[str, str]:
    labels = status.get("labels")
    if not isinstance(labels, dict):
        return {}
    return {str(k)[:64]: str(v)[:64] for k, v in list(labels.items())[:32]}


def _models(status: dict[str, Any]) -> list[dict[str, str]]:
    """The models a device says it runs: names and versions as short strings, or left out.

    The device wrote its status: a missing, unhashable or non-string name must not
    break the view for the whole fleet (sorting and grouping by name).
    """
    models = status.get("models")
    if not isinstance(models, list):
        return []
    return [
        {"name": m["name"][:64], "version": str(m.get("version"))[:64]}
        for m in models[:32]
        if isinstance(m, dict) and isinstance(m.get("name"), str)
    ]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def desired_versions(rollouts: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """device -> model -> the version its newest rollout asked for (newest first in)."""
    desired: dict[str, dict[str, str]] = {}
    for rollout in rollouts:  # newest first: the first rollout that names a device wins
        if rollout.get("state") == "aborted":
            continue
        for device_id, state in (rollout.get("devices") or {}).items():
            if (state or {}).get("stage") in ("rolled_back",):
                continue
            desired.setdefault(device_id, {}).setdefault(rollout["model"], rollout["version"])
    return desired


def fleet_view(
    devices: list[dict[str, Any]],
    rollouts: list[dict[str, Any]],
    history: ServingHistory,
    *,
    now: float,
    stale_after_s: float,
) -> dict[str, Any]:
    """Every device with its health, and the version distribution per label."""
    desired = desired_versions(rollouts)
    rows = []
    for dev in devices:
        device_id = dev["device_id"]
        seen = _number(dev.get("last_seen"))
        age = None if seen is None else max(0.0, now - seen)
        telemetry = dev.get("telemetry") or {}
        router = telemetry.get("router") or {}
        totals = telemetry.get("totals") or {}
        requests = _number(totals.get("requests")) or 0.0
        escalated = _number(totals.get("escalated")) or 0.0
        failed = [
            r["id"]
            for r in rollouts
            if ((r.get("devices") or {}).get(device_id) or {}).get("stage") == "failed"
        ]
        rows.append(
            {
                "device_id": device_id,
                "state": dev.get("state"),
                "heartbeat_age_s": None if age is None else round(age, 1),
                "stale": dev.get("state") == "online" and (age is None or age > stale_after_s),
                "labels": _labels(dev),
                "models": _models(dev),
                "desired": desired.get(device_id, {}),
                "p95_ms": history.local_p95_by_device.get(device_id),
                "requests": requests,
                # at most 1 (escalations are requests): 1 / 5e-324 would be Infinity, no JSON
                "escalation_rate": min(1.0, escalated / requests) if requests else None,
                "escalation_reasons": dict(history.reasons_by_device.get(device_id) or {}),
                "circuit": router.get("circuit"),
                "degraded": _number(totals.get("degraded")) or 0.0,
                "failed_rollouts": failed,
            }
        )
    return {"devices": rows, "versions_by_label": versions_by_label(rows)}


def versions_by_label(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per label (``site=berlin``; ``all`` for the whole fleet) and model: desired vs running."""
    groups: dict[tuple[str, str], dict[str, Counter[str]]] = {}
    for row in rows:
        keys = ["all", *(f"{k}={v}" for k, v in sorted(row["labels"].items()))]
        running = {m["name"]: m["version"] for m in row["models"]}
        for model in sorted(set(running) | set(row["desired"])):
            for label in keys:
                empty: dict[str, Counter[str]] = {"desired": Counter(), "running": Counter()}
                group = groups.setdefault((label, model), empty)
                if model in row["desired"]:
                    group["desired"][row["desired"][model]] += 1
                if model in running:
                    group["running"][str(running[model])] += 1
    return [
        {"label": label, "model": model, **{k: dict(v) for k, v in g.items()}}
        for (label, model), g in sorted(groups.items())
    ]


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE, headers={"Cache-Control": "no-cache"})


async def static_file(request: web.Request) -> web.FileResponse:
    entry = VENDOR.get(request.match_info["file"])
    if entry is None:
        raise NotFoundError("no such file")
    relative, content_type = entry
    return web.FileResponse(STATIC / relative, headers={"Content-Type": content_type})


async def fleet(request: web.Request) -> web.Response:
    sources = request.app[SOURCES]
    devices = await asyncio.to_thread(sources.registry.devices)
    rollouts = await asyncio.to_thread(sources.registry.rollouts, 50)
    view = fleet_view(
        devices,
        rollouts,
        sources.history,
        now=time.time(),
        stale_after_s=sources.stale_after_s,
    )
    return web.json_response(view)


async def serving(request: web.Request) -> web.Response:
    sources = request.app[SOURCES]
    return web.json_response({**sources.history.to_dict(), "fallbacks": sources.scraper.to_dict()})
