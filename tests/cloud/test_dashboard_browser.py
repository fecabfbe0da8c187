"""The dashboard in a real browser: Debian's chromium driven by Playwright.

A real control plane, two real agents and a real fallback serve real requests;
the test reads what the page shows (DOM) and what it plotted (uPlot's data),
with every request that would leave localhost aborted and recorded. Screenshots
of each view go to ``test-artifacts/``. Skips, saying why, where chromium or
Playwright is missing (scripts/test.sh installs chromium where it can).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from common.manifest import RoutingHints
from edge.agent import EdgeAgent
from tests.broker_per_test import mosquitto_per_test  # noqa: F401  (own broker)
from tests.edge.agent_harness import ControlPlane, agent_config
from tests.edge.staged_harness import Traffic, api, wait_baseline, wait_finished
from tests.model_fixtures import make_package, v2_infer_body
from tests.server_processes import start_fallback

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# What the machine's closed network needs (see the env notes): no background calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _browser_or_skip():  # type: ignore[no-untyped-def]
    playwright = pytest.importorskip("playwright.async_api", reason="playwright not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium: `apt-get install chromium` (scripts/test.sh tries)")
    return playwright


async def _traffic(agent: EdgeAgent, local: int, heavy: int) -> None:
    url = f"{agent.config.api_url}/v2/models/toy/infer"
    async with aiohttp.ClientSession() as s:
        for rows in [1] * local + [4] * heavy:  # 4 rows > max_local_batch 2: heavy, to the cloud
            async with s.post(url, json=v2_infer_body(rows)) as resp:
                assert resp.status == 200, await resp.text()


async def test_dashboard_shows_the_fleet_rollout_and_edge_cloud_split(mosquitto, tmp_path):
    playwright_api = _browser_or_skip()
    cloud_pkg = make_package(tmp_path / "cloud-pkg", variant="cloud", seed=3)
    fallback = start_fallback(cloud_pkg, tmp_path)
    try:
        async with ControlPlane(
            tmp_path / "control", mosquitto, fallback_metrics_urls=(fallback.url,)
        ) as cp:
            edge_pkg = make_package(
                tmp_path / "edge-pkg", routing=RoutingHints(max_local_batch=2), signer=cp.signer
            )
            cp.registry.publish(edge_pkg.directory, edge_pkg.manifest, cp.signer)
            configs = [
                agent_config(
                    tmp_path,
                    f"dash-{i}",
                    mosquitto,
                    cp.signer.public_key_hex,
                    cloud_url=fallback.url,
                )
                for i in range(2)
            ]
            async with EdgeAgent(configs[0]) as a0, EdgeAgent(configs[1]) as a1:
                ids = [c.device_id for c in configs]
                await cp.wait_online(ids)
                rollout = await cp.roll_out("toy", "1", ids)
                assert rollout["state"] == "succeeded", rollout
                await asyncio.gather(_traffic(a0, 30, 5), _traffic(a1, 20, 5))
                await wait_baseline(cp, "toy", "1", ids)
                await asyncio.sleep(1.5)  # and the serving history has every report
                await _check_in_browser(playwright_api, cp, ids, rollout["id"], fallback.url)
                staged = await _staged_rollout(cp, tmp_path, ids, [a0, a1])
                await _check_staged_page(playwright_api, cp, ids, staged)
    finally:
        fallback.stop()


async def _staged_rollout(cp, tmp_path, ids, agents) -> str:  # type: ignore[no-untyped-def]
    """Version 2 in two stages under steady traffic, so each stage's gates are judged."""
    v2 = make_package(
        tmp_path / "edge-pkg-2",
        version="2",
        release=2,
        routing=RoutingHints(max_local_batch=2),
        signer=cp.signer,
        seed=1,
    )
    cp.registry.publish(v2.directory, v2.manifest, cp.signer)
    async with Traffic(agents):
        body = {"model": "toy", "version": "2", "to": "all", "stages": "50%,100%", "soak": "1s"}
        body["max_latency_increase"] = 50.0  # a busy machine's p95 is noise, not a regression
        status, doc = await api(cp, "POST", "/api/staged-rollouts", body)
        assert status == 201, doc
        done = await wait_finished(cp, doc["id"], timeout=120)
    assert done["state"] == "succeeded" and len(done["reports"]) == 2, done["halt_reason"]
    return doc["id"]


async def _check_staged_page(playwright_api, cp, ids, rollout_id) -> None:  # type: ignore[no-untyped-def]
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1300, "height": 900})
            await page.goto(f"{cp.url}/#token={cp.tokens['viewer']}")
            await page.click("#nav-rollouts")
            await page.click(f"#rollouts a:text('{rollout_id}')")
            await page.wait_for_selector("#stages .card[data-stage='1']")
            cards = await page.locator("#stages .card").all_inner_texts()
            assert [c.splitlines()[0] for c in cards] == ["Stage 1: 50%", "Stage 2: 100%"]
            assert all("escalation_rate" in c and "latency_p95_ms" in c for c in cards), cards
            assert not any("BREACHED" in c for c in cards)
            devices = await page.inner_text("#rollout-devices")
            assert all(d in devices for d in ids) and devices.count("active") == 2
            await page.click("button[data-action=pause]")
            await page.wait_for_function(
                "document.getElementById('action-result').textContent.startsWith('pause:')"
            )
            assert "operator" in await page.inner_text("#action-result")
            await page.screenshot(path=ARTIFACTS / "dashboard-staged.png", full_page=True)
        finally:
            await browser.close()


async def _check_in_browser(playwright_api, cp, ids, rollout_id, fallback_url) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    left_localhost: list[str] = []

    async def only_localhost(route) -> None:  # type: ignore[no-untyped-def]
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            await route.continue_()
        else:
            left_localhost.append(route.request.url)
            await route.abort()

    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1300, "height": 900})
            await page.route("**/*", only_localhost)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{cp.url}/#token={cp.tokens['viewer']}")

            # Fleet: both devices online, running toy 1, with their requests counted.
            for device_id in ids:
                cell = page.locator("#devices tbody tr", has_text=device_id)
                await cell.wait_for(timeout=15000)
                text = await cell.inner_text()
                assert "online" in text and "toy 1" in text, text
            fleet = await page.evaluate("window.fogline.data.fleet")
            requests = {
                d["device_id"]: d["requests"] for d in fleet["devices"] if d["device_id"] in ids
            }
            assert requests == {ids[0]: 35, ids[1]: 25}, requests
            reasons = {d["device_id"]: d["escalation_reasons"] for d in fleet["devices"]}
            assert reasons[ids[0]] == {"heavy": 5}, reasons
            p95 = {d["device_id"]: d["p95_ms"] for d in fleet["devices"] if d["device_id"] in ids}
            assert all(0 < v < 1000 for v in p95.values()), p95
            assert " ms" in text  # the p95 cell is filled
            versions = {(v["label"], v["model"]): v for v in fleet["versions_by_label"]}
            assert versions[("all", "toy")]["running"].get("1", 0) >= 2
            assert "token" not in page.url  # the fragment is dropped once read
            await page.screenshot(path=ARTIFACTS / "dashboard-fleet.png", full_page=True)

            # Serving: the plotted series split edge (50 single rows) vs cloud (10 heavy).
            await page.click("#nav-serving")
            await page.wait_for_function("window.fogline.charts.requests !== undefined")
            await page.wait_for_function(
                "window.fogline.charts.fallback && window.fogline.data.serving.fallbacks[0].ok"
            )
            plotted = await page.evaluate("window.fogline.charts.requests.data")
            edge, cloud = sum(plotted[1]), sum(plotted[2])
            assert (edge, cloud) == (50, 10), plotted
            reasons_text = await page.inner_text("#reasons")
            assert "heavy" in reasons_text and "10" in reasons_text
            histograms = await page.eval_on_selector_all(
                "#latency svg.hist", "nodes => nodes.map(n => JSON.parse(n.dataset.values))"
            )
            assert sum(map(sum, histograms)) == 60, histograms  # every request in some bucket
            fallback_rows = await page.inner_text("#fallbacks")
            assert fallback_url in fallback_rows and "unreachable" not in fallback_rows
            # The fallback's own Prometheus counters: the 10 heavy batches it answered.
            await page.wait_for_function(
                "Object.values(window.fogline.data.serving.fallbacks[0].models)"
                ".some(m => m.success >= 10)"
            )
            scraped = await page.evaluate("window.fogline.data.serving.fallbacks[0].models")
            (served,) = [m for m in scraped.values() if m.get("success")]
            assert served["success"] == 10 and served["mean_batch"] >= 1, scraped
            await page.screenshot(path=ARTIFACTS / "dashboard-serving.png", full_page=True)

            # A rollout's page: per-device state; a viewer's button press is refused.
            await page.click("#nav-rollouts")
            await page.click(f"#rollouts a:text('{rollout_id}')")
            await page.wait_for_selector("#rollout-devices tbody tr")
            device_rows = await page.inner_text("#rollout-devices")
            assert all(d in device_rows for d in ids) and "activated" in device_rows
            await page.click("button[data-action=abort]")
            await page.wait_for_function(
                "document.getElementById('action-result').textContent.startsWith('abort:')"
            )
            result = await page.inner_text("#action-result")
            assert "done" not in result and "operator" in result, result
            assert cp.registry.rollout(rollout_id)["state"] == "succeeded"
            await page.screenshot(path=ARTIFACTS / "dashboard-rollout.png", full_page=True)
            assert errors == [], errors
        finally:
            await browser.close()
    assert left_localhost == [], left_localhost
