"""Who said it: events, status and telemetry count for the device whose topic they came on.

An attacker here is any MQTT client of the real Mosquitto (the broker's ACL is
a separate layer): it publishes on its own or another device's topics, quotes
real command ids it saw, sends absurd figures, and takes the control plane's
old, guessable client id.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from cloud.telemetry import TelemetryLimiter, telemetry_increments
from common import messages, topics
from common.errors import InvalidInputError
from common.mqtt import MqttLink
from tests.edge.agent_harness import ControlPlane


def _client(broker, client_id: str | None = None) -> MqttLink:
    return MqttLink(
        client_id=client_id or f"attacker-{uuid.uuid4().hex[:6]}",
        host=broker.host,
        port=broker.port,
    )


async def _until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_a_fake_activated_on_another_topic_does_not_advance_a_rollout(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cp.registry.upsert_device("ghost", {"state": "offline"})  # seen once, silent since
        rollout_id = await cp.rollouts.start("toy", "1", ["ghost"])
        command_id = cp.registry.rollout(rollout_id)["devices"]["ghost"]["command_id"]
        async with _client(mosquitto) as evil:
            await evil.wait_connected(10)
            for stage in ("downloading", "staged", "activated"):
                # On its own topic, quoting ghost's command id and claiming to be ghost.
                payload = messages.event("ghost", command_id, stage)
                await evil.publish(topics.device_topic("evil", "events"), payload)
            await _until(lambda: len(cp.registry.events("evil")) == 3)
        state = cp.registry.rollout(rollout_id)
        assert state["devices"]["ghost"]["stage"] == "sent"
        assert state["state"] == "running"
        # The events are kept, under the device that really sent them.
        assert {e["device_id"] for e in cp.registry.events("evil")} == {"evil"}
        assert cp.registry.events("ghost") == []


async def test_status_counts_for_the_topic_not_the_payload(mosquitto, tmp_path) -> None:
    # NOTE: ids unique to this test: the session's broker keeps other tests' retained status.
    a, b, c = (f"dev-{x}-{uuid.uuid4().hex[:6]}" for x in "abc")
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        async with _client(mosquitto) as evil:
            await evil.wait_connected(10)
            doc = json.loads(messages.status(b, online=True))
            await evil.publish(topics.device_topic(a, "status"), json.dumps(doc).encode())
            doc["state"] = "owned"
            await evil.publish(topics.device_topic(c, "status"), json.dumps(doc).encode())

            def mine() -> dict[str, dict]:
                found = {d["device_id"]: d for d in cp.registry.devices()}
                return {k: v for k, v in found.items() if k in (a, b, c)}

            await _until(lambda: len(mine()) == 2)
        devices = mine()
        assert set(devices) == {a, c}  # no phantom b
        assert devices[a]["state"] == "online"
        assert devices[c]["state"] == "unknown"


async def test_implausible_or_too_frequent_telemetry_is_dropped(mosquitto, tmp_path) -> None:
    bogus = {
        "dev-big": b'{"router": {"requests": 1000000000}}',
        "dev-neg": b'{"router": {"requests": -5}}',
        "dev-nan": b'{"router": {"requests": NaN}}',
        "dev-inf": b'{"router": {"escalated": {"uncertain": Infinity}}}',
        "dev-str": b'{"router": {"requests": "5"}}',
        "dev-esc": b'{"router": {"escalated": {"a": 900000, "b": 900000}}}',
        "dev-shape": b'{"router": [1, 2]}',
    }
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        async with _client(mosquitto) as dev:
            await dev.wait_connected(10)
            names = [*bogus, "dev-flood", "dev-ok"]
            for d in names:
                await dev.publish(topics.device_topic(d, "status"), messages.status(d, True))
            # NOTE: other tests' retained status may be there too: count only these.
            await _until(
                lambda: (
                    len({x["device_id"] for x in cp.registry.devices()} & set(names)) == len(names)
                )
            )
            for d, payload in bogus.items():
                await dev.publish(topics.device_topic(d, "telemetry"), payload)
            for _ in range(50):  # a flood: far more than one a second
                await dev.publish(
                    topics.device_topic("dev-flood", "telemetry"), b'{"router": {"requests": 1}}'
                )
            await dev.publish(
                topics.device_topic("dev-ok", "telemetry"), b'{"router": {"requests": 7}}'
            )

            def telemetry(d: str) -> dict | None:
                return {x["device_id"]: x for x in cp.registry.devices()}[d]["telemetry"]

            await _until(lambda: telemetry("dev-ok") is not None)
            await asyncio.sleep(0.3)
        for d in bogus:
            assert telemetry(d) is None, d
        assert telemetry("dev-flood")["totals"]["requests"] <= 5  # burst 3, ~1/s after
        assert telemetry("dev-ok")["totals"] == {"requests": 7}


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ({}, {}),
        ({"router": {"requests": 3, "escalated": {"heavy": 1, "uncertain": 2}}},
         {"requests": 3, "escalated": 3}),
        ({"router": {"requests": 0.5, "degraded": 0}}, {"requests": 0.5, "degraded": 0}),
        ({"router": {"requests": None}}, {}),
        ({"router": {"requests": 1e6}}, {"requests": 1e6}),
        ({"router": {"requests": 1e6 + 1}}, None),
        ({"router": {"requests": True}}, None),
        ({"router": {"requests": -0.1}}, None),
        ({"router": {"requests": float("nan")}}, None),
        ({"router": {"escalated": [1]}}, None),
        ({"router": {"escalated": {"x": "1"}}}, None),
        ({"router": "many"}, None),
    ],
)  # fmt: skip
def test_telemetry_increments_table(report, expected) -> None:
    if expected is None:
        with pytest.raises(InvalidInputError):
            telemetry_increments(report)
    else:
        assert telemetry_increments(report) == expected


def test_telemetry_limiter_allows_a_burst_then_one_per_interval() -> None:
    limiter = TelemetryLimiter(interval_s=1.0, burst=3)
    assert [limiter.allow("d", now=0.0) for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("other", now=0.0)  # per device
    assert not limiter.allow("d", now=0.5)
    assert limiter.allow("d", now=1.6) and not limiter.allow("d", now=1.7)
    assert [limiter.allow("d", now=100.0) for _ in range(4)] == [True, True, True, False]


async def test_a_client_cannot_take_the_control_planes_mqtt_session(mosquitto, tmp_path) -> None:
    """The old id was ``fogline-control-{port}``: a device taking it kicked the plane off
    the broker and stole its events. Now the id is random per process."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        link = cp.rollouts.link
        assert link.client_id != f"fogline-control-{cp.settings.port}"
        async with ControlPlane(tmp_path / "control2", mosquitto) as other:
            assert other.rollouts.link.client_id != link.client_id
        async with (
            _client(mosquitto, f"fogline-control-{cp.settings.port}") as thief,
            _client(mosquitto) as device,
        ):
            await thief.wait_connected(10)
            await device.wait_connected(10)
            for i in range(50):
                payload = messages.event("dev-s", f"c{i}", "downloading")
                await device.publish(topics.device_topic("dev-s", "events"), payload)
            await _until(lambda: len(cp.registry.events("dev-s")) == 50)
            assert link.connected.is_set()
