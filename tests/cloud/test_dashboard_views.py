"""The dashboard's views as tables of cases: fleet health, versions per label,
the serving history (fed hostile reports), and the fallback scrape parser."""

from __future__ import annotations

import asyncio
import json
import math

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from cloud import serving_history
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
    for device, report in (
        ("d1", _report(10, 3, {"heavy": 2, "uncertain": 1}, hist, p95=1.5)),
        ("d2", _report(5, 0, {}, hist, p95=2.5)),
    ):
        history.add(device, report, [("m:1", report["router"])])
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
    history.add("d1", {"router": router}, [("m:1", router)])
    view = history.to_dict()
    assert sum(view["series"]["edge"]) == 0 and sum(view["series"]["cloud"]) == 0
    assert view["escalation_reasons"] == {}
    assert all(c == 0 for s in view["latency"] for c in s["counts"])


def test_made_up_reasons_and_model_versions_stay_bounded() -> None:
    history = ServingHistory()
    for i in range(200):
        history.add("d1", _report(escalated={f"r{i}": 1}), [])
        hist = [1] * (len(LATENCY_BUCKETS_MS) + 1)
        report = _report(1, hist=hist)
        history.add("d1", report, [(f"m{i}:1", report["router"])])
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


# -- red team: what a device or a fallback writes must not break a view for everyone --


@pytest.mark.parametrize(
    "models",
    [
        [{"version": "1"}, {"name": "m", "version": "1"}],  # no name: None sorts with no str
        [{"name": ["m"], "version": "1"}],  # unhashable name
        [{"name": {"a": 1}, "version": {"b": 2}}],
        7,  # not a list at all
    ],
)
def test_a_device_status_with_hostile_models_does_not_break_the_fleet_view(models) -> None:
    devices = [_device("evil", models=models), _device("ok", models=[{"name": "m", "version": 1}])]
    view = fleet_view(devices, [], ServingHistory(), now=100.0, stale_after_s=10)
    rows = {r["device_id"]: r for r in view["devices"]}
    assert rows["ok"]["models"] == [{"name": "m", "version": "1"}]
    assert all(isinstance(m["name"], str) for m in rows["evil"]["models"])
    table = {(v["label"], v["model"]): v["running"] for v in view["versions_by_label"]}
    assert table[("all", "m")]["1"] >= 1


def test_a_denormal_request_count_makes_no_infinite_escalation_rate() -> None:
    telemetry = {"totals": {"requests": 5e-324, "escalated": 1e6}}
    view = fleet_view(
        [_device("evil", telemetry=telemetry)], [], ServingHistory(), now=100.0, stale_after_s=10
    )
    json.dumps(view, allow_nan=False)  # the page's JSON.parse reads no Infinity
    assert view["devices"][0]["escalation_rate"] == 1.0


def test_a_hostile_fallback_makes_no_infinite_figures() -> None:
    text = "\n".join(
        [
            'nv_inference_request_success{model="m",version="1"} 1e-320',
            'nv_inference_queue_duration_us{model="m",version="1"} 1e300',
            'nv_inference_compute_infer_duration_us{model="m",version="1",gpu="0"} 1.7e308',
            'nv_inference_compute_infer_duration_us{model="m",version="1",gpu="1"} 1.7e308',
            'nv_inference_exec_count{model="m",version="1"} 1e-320',
            'nv_inference_count_total{model="m",version="1"} 1e300',
            "",
        ]
    )
    scrape = FallbackScrape("http://x")
    scrape.update({"m:1": {"success": 0.0}}, 1.0)
    scrape.update(parse_metrics(text), 2.0)
    json.dumps(scrape.to_dict(), allow_nan=False)  # ValueError on inf: the serving view's JSON


def test_telemetry_under_made_up_device_ids_keeps_per_device_figures_bounded(monkeypatch) -> None:
    """A broker without an ACL lets anyone report under any id, known to the plane or not."""
    monkeypatch.setattr(serving_history, "MAX_DEVICES", 10)
    history = ServingHistory()
    for i in range(50):
        history.add(f"made-up-{i}", _report(1, escalated={"uncertain": 1}, p95=2.0), [])
    assert len(history.reasons_by_device) == 10 and len(history.local_p95_by_device) == 10
    assert history.to_dict()["escalation_reasons"] == {"uncertain": 50}  # still counted


def test_a_fallback_with_endless_histogram_buckets_stays_bounded() -> None:
    """1 MiB of `le` values is ~30,000 buckets: an SVG bar each, redrawn every 3 s."""
    lines = [
        f'nv_inference_batch_size_bucket{{model="m",version="1",le="{i}"}} {i}' for i in range(5000)
    ]
    (entry,) = parse_metrics("\n".join([*lines, ""])).values()
    assert 0 < len(entry["batch_size"]) <= 64


def test_made_up_reasons_sent_first_do_not_hide_the_fleets_real_escalations() -> None:
    history = ServingHistory(bucket_s=3600)
    history.add("evil", _report(escalated={f"junk{i}": 1 for i in range(MAX_REASONS)}), [])
    history.add("honest", _report(escalated={"uncertain": 3, "heavy": 2}), [])
    reasons = history.to_dict()["escalation_reasons"]
    assert reasons["uncertain"] == 3 and reasons["heavy"] == 2


def test_triton_counters_named_without_total_are_read() -> None:
    """Triton itself exports `nv_inference_count 12` (no `_total`): a name ending in _count."""
    text = (
        "# TYPE nv_inference_count counter\n"
        'nv_inference_count{model="m",version="1"} 12\n'
        "# TYPE nv_inference_exec_count counter\n"
        'nv_inference_exec_count{model="m",version="1"} 3\n'
    )
    assert parse_metrics(text)["m:1"]["mean_batch"] == 4
