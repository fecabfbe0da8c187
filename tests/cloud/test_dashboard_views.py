"""The dashboard's views as tables of cases: fleet health, versions per label,
the serving history (fed hostile reports), and the fallback scrape parser."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from cloud.dashboard import fleet_view
from cloud.fallback_metrics import MAX_BYTES, FallbackScrape, FallbackScraper, parse_metrics
from cloud.serving_history import LATENCY_BUCKETS_MS, MAX_REASONS, MAX_SERIES, ServingHistory
from tests.conftest import free_port


def _device(device_id: str, state: str = "online", seen: float = 100.0, **extra) -> dict:
    return {"device_id": device_id, "state": state, "last_seen": seen, "models": [], **extra}


def _report(local=0, cloud=0, escalated=None, hist=None, p95=None) -> dict:
    latency = {"local": {"count": local, "hist": hist, "p95_ms": p95}}
    return {
        "router": {
            "served_local": local,
            "served_cloud": cloud,
            "escalated": escalated or {},
            "local_version": "1",
            "latency_ms": latency,
        }
    }


def test_stale_offline_and_failed_devices_are_flagged() -> None:
    devices = [
        _device("fresh", seen=95),
        _device("stale", seen=50),
        _device("gone", state="offline", seen=10),
        _device("never", seen=None),
    ]
    rollouts = [
        {
            "id": "r1",
            "model": "m",
            "version": "2",
            "state": "failed",
            "devices": {"fresh": {"stage": "failed"}},
        }
    ]
    view = fleet_view(devices, rollouts, ServingHistory(), now=100.0, stale_after_s=10)
    rows = {r["device_id"]: r for r in view["devices"]}
    assert [rows[d]["stale"] for d in ("fresh", "stale", "gone", "never")] == [
        False,
        True,
        False,
        True,
    ]
    assert rows["stale"]["heartbeat_age_s"] == 50.0
    assert rows["fresh"]["failed_rollouts"] == ["r1"] and rows["stale"]["failed_rollouts"] == []


def test_versions_by_label_compare_what_rollouts_asked_for_with_what_runs() -> None:
    devices = [
        _device("a", labels={"site": "berlin"}, models=[{"name": "m", "version": "1"}]),
        _device("b", labels={"site": "berlin"}, models=[{"name": "m", "version": "2"}]),
        _device("c", labels={"site": "oslo"}, models=[{"name": "m", "version": "1"}]),
    ]
    rollouts = [  # newest first: the newest rollout naming a device says what it should run
        {"id": "r2", "model": "m", "version": "2", "state": "running", "devices": {"a": {}}},
        {"id": "r3", "model": "m", "version": "2", "state": "running", "devices": {"b": {}}},
        {"id": "r1", "model": "m", "version": "1", "state": "succeeded", "devices": {"c": {}}},
        {"id": "r0", "model": "m", "version": "9", "state": "aborted", "devices": {"c": {}}},
    ]
    view = fleet_view(devices, rollouts, ServingHistory(), now=100.0, stale_after_s=10)
    by_label = view["versions_by_label"]
    table = {(v["label"], v["model"]): (v["desired"], v["running"]) for v in by_label}
    assert table[("site=berlin", "m")] == ({"2": 2}, {"1": 1, "2": 1})
    assert table[("site=oslo", "m")] == ({"1": 1}, {"1": 1})
    assert table[("all", "m")] == ({"2": 2, "1": 1}, {"1": 2, "2": 1})


def test_history_splits_edge_and_cloud_and_keeps_histograms_per_model_version() -> None:
    history = ServingHistory(bucket_s=60)
    hist = [1] * (len(LATENCY_BUCKETS_MS) + 1)
    history.add("d1", _report(10, 3, {"heavy": 2, "uncertain": 1}, hist, p95=1.5), "m:1")
    history.add("d2", _report(5, 0, {}, hist, p95=2.5), "m:1")
    view = history.to_dict()
    assert sum(view["series"]["edge"]) == 15 and sum(view["series"]["cloud"]) == 3
    assert view["escalation_reasons"] == {"heavy": 2, "uncertain": 1}
    (edge,) = [s for s in view["latency"] if s["where"] == "edge"]
    assert edge["model"] == "m:1" and edge["counts"] == [2] * len(hist)
    assert history.local_p95_by_device == {"d1": 1.5, "d2": 2.5}


@pytest.mark.parametrize(
    "router",
    [
        {"served_local": math.nan, "served_cloud": -5, "degraded": "many"},
        {"served_local": 1e300, "escalated": {"../x": 5, "": 1, "a" * 300: 1}},
        {"escalated": [1, 2]},
        {"latency_ms": {"local": {"hist": [1e300] * 3}}},
        {"latency_ms": {"local": {"hist": ["x"] * (len(LATENCY_BUCKETS_MS) + 1)}}},
    ],
)
def test_hostile_reports_add_nothing_that_is_not_a_plausible_count(router) -> None:
    history = ServingHistory()
    history.add("d1", {"router": router}, "m:1")
    view = history.to_dict()
    assert sum(view["series"]["edge"]) == 0 and sum(view["series"]["cloud"]) == 0
    assert view["escalation_reasons"] == {}
    assert all(c == 0 for s in view["latency"] for c in s["counts"])


def test_made_up_reasons_and_model_versions_stay_bounded() -> None:
    history = ServingHistory()
    for i in range(200):
        history.add("d1", _report(escalated={f"r{i}": 1}), f"m{i}:1")
        hist = [1] * (len(LATENCY_BUCKETS_MS) + 1)
        history.add("d1", _report(1, hist=hist), f"m{i}:1")
    view = history.to_dict()
    assert len(view["escalation_reasons"]) <= MAX_REASONS
    assert len(history.reasons_by_device["d1"]) <= MAX_REASONS
    assert len(view["latency"]) <= MAX_SERIES


def _triton_like_metrics(histograms: bool) -> str:
    """Exposition text as prometheus_client writes it, in Triton's names."""
    reg = CollectorRegistry()
    labels = ["model", "version"]
    Counter("nv_inference_request_success", "ok", labels, registry=reg).labels("m", "1").inc(10)
    Counter("nv_inference_count", "inferences", labels, registry=reg).labels("m", "1").inc(10)
    Counter("nv_inference_exec_count", "executions", labels, registry=reg).labels("m", "1").inc(4)
    batch = Histogram("fogline_batch_size", "batch", labels, buckets=(1, 4, 8), registry=reg)
    for size in (1, 4, 4, 1):
        batch.labels("m", "1").observe(size)
    for name, total in (("queue", 2000.0), ("compute_infer", 8000.0)):
        full = f"nv_inference_{name}_duration_us"
        if histograms:
            h = Histogram(full, name, labels, buckets=(100, 1000), registry=reg)
            for _ in range(10):
                h.labels("m", "1").observe(total / 10)
        else:
            Counter(full, name, labels, registry=reg).labels("m", "1").inc(total)
    return generate_latest(reg).decode()


@pytest.mark.parametrize("histograms", [False, True])
def test_fallback_metrics_give_batching_and_queue_vs_compute(histograms) -> None:
    models = parse_metrics(_triton_like_metrics(histograms))
    m = models["m:1"]
    assert m["success"] == 10 and m["mean_batch"] == 2.5
    assert m["queue_us_per_request"] == 200 and m["compute_us_per_request"] == 800
    assert m["batch_size"]["4.0"] == 4 and m["batch_size"]["+Inf"] == 4


def test_each_interval_has_its_own_queue_and_compute_times() -> None:
    scrape = FallbackScrape("http://x")
    scrape.update({"m:1": {"success": 10, "queue_us": 1000, "compute_us": 5000}}, 1.0)
    scrape.update({"m:1": {"success": 20, "queue_us": 4000, "compute_us": 6000}}, 2.0)
    assert [(q, c) for _, _, q, c in scrape.history][-1] == (300, 100)


async def test_a_broken_or_hostile_fallback_is_reported_not_raised() -> None:
    answers = {
        "/a/metrics": web.Response(status=500),
        "/b/metrics": web.Response(body=b"# TYPE x counter\nx{" + b"a" * 100),
        "/c/metrics": web.Response(body=b"x 1\n" * (MAX_BYTES // 4 + 10)),
    }

    async def metrics(request: web.Request) -> web.StreamResponse:
        return answers[request.path]

    app = web.Application()
    app.router.add_get("/{which}/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        base = f"http://127.0.0.1:{port}"
        dead = f"http://127.0.0.1:{free_port()}"
        scraper = FallbackScraper([f"{base}/a", f"{base}/b", f"{base}/c", dead])
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(scraper.scrape(session, s) for s in scraper.scrapes))
        errors = {s.url.rsplit("/", 1)[-1]: s.error for s in scraper.scrapes}
        assert all(not s.ok for s in scraper.scrapes), errors
        assert "500" in errors["a"] and "bytes" in errors["c"]
    finally:
        await runner.cleanup()
