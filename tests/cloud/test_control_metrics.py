"""The control plane's /metrics, scraped from a real control plane and parsed by
prometheus_client's own parser: fleet and rollouts by state, MQTT traffic, API latency."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from common import messages, topics
from common.mqtt import MqttLink
from tests.edge.agent_harness import ControlPlane


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample as (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def _scrape(s: aiohttp.ClientSession, cp: ControlPlane, role: str = "metrics") -> dict:
    async with s.get(f"{cp.url}/metrics", headers=cp.auth(role)) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/plain"
        return _samples(await resp.text())


async def test_a_scrape_shows_fleet_rollouts_mqtt_and_api_latency(
    private_mosquitto, tmp_path
) -> None:
    mosquitto = private_mosquitto  # it counts the whole fleet: no other test's devices
    device = f"cam-{uuid.uuid4().hex[:6]}"
    async with ControlPlane(tmp_path / "control", mosquitto) as cp, aiohttp.ClientSession() as s:
        cp.publish_toy(tmp_path, "1")
        before = await _scrape(s, cp)
        assert _value(before, "fogline_control_devices", state="online") == 0
        assert _value(before, "fogline_control_rollouts", state="running") == 0
        async with MqttLink(client_id=device, host=mosquitto.host, port=mosquitto.port) as dev:
            await dev.wait_connected(10)
            await dev.publish(topics.device_topic(device, "status"), messages.status(device, True))
            await cp.wait_online([device])
        body = {"model": "toy", "version": "1", "devices": [device]}
        async with s.post(f"{cp.url}/api/rollouts", json=body, headers=cp.auth("operator")) as r:
            assert r.status == 202
            rollout_id = (await r.json())["id"]
        async with s.get(f"{cp.url}/api/rollouts/{rollout_id}", headers=cp.auth("viewer")) as r:
            assert r.status == 200
        async with s.get(f"{cp.url}/api/rollouts/no-such-one", headers=cp.auth("viewer")) as r:
            assert r.status == 404
        async with asyncio.timeout(10):  # the command goes out after the 202
            while not _value(
                after := await _scrape(s, cp),
                "fogline_control_mqtt_messages_total",
                direction="out",
                kind="commands",
            ):
                await asyncio.sleep(0.1)
        # A viewer may scrape too: every role includes the ones before it.
        assert await _scrape(s, cp, "viewer")

    assert _value(after, "fogline_control_devices", state="offline") == 0
    assert _value(after, "fogline_control_devices", state="online") == 1  # its will not yet sent
    assert _value(after, "fogline_control_rollouts", state="running") == 1
    assert _value(after, "fogline_control_rollouts", state="aborted") == 0  # listed at 0
    assert _value(after, "fogline_control_mqtt_messages_total", direction="in", kind="status") >= 1
    post = {"route": "/api/rollouts", "method": "POST", "status": "2xx"}
    latency = "fogline_control_api_request_duration_seconds"
    assert _value(after, f"{latency}_count", **post) == 1
    assert _value(after, f"{latency}_bucket", **post, le="+Inf") == 1
    assert _value(after, f"{latency}_sum", **post) > 0
    # The route pattern, never the id a caller chose: 404s and real ids share one series.
    one = {"route": "/api/rollouts/{id}", "method": "GET"}
    assert _value(after, f"{latency}_count", **one, status="2xx") == 1
    assert _value(after, f"{latency}_count", **one, status="4xx") == 1
    labels = {v for (_, lbls) in after for _, v in lbls}
    assert "no-such-one" not in labels and rollout_id not in labels and device not in labels


async def test_metrics_need_a_token_and_unrouted_paths_add_no_series(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp, aiohttp.ClientSession() as s:
        async with s.get(f"{cp.url}/metrics") as resp:
            assert resp.status == 401
            assert "text" not in resp.content_type or "fogline_control" not in await resp.text()
        for path in ("/x/etc/passwd", "/" + "a" * 2000, "/api/rollouts/a/b"):
            async with s.get(cp.url + path, headers=cp.auth("admin")) as resp:
                assert resp.status == 404
        # A metrics token opens nothing else (the route table test checks every route).
        async with s.get(f"{cp.url}/api/devices", headers=cp.auth("metrics")) as resp:
            assert resp.status == 403
        samples = await _scrape(s, cp)
    routes = {v for (_, lbls) in samples for k, v in lbls if k == "route"}
    assert routes <= {"/metrics", "/api/devices"}, routes
