"""A stolen device's broker login may write its own status and events topics: bounded.

The ACL lets an enrolled device write ``devices/{own id}/events`` and ``status``
(and the broker takes packets up to 4 MiB). Red team: one device publishing
large events in a loop grew the control plane's database without limit (every
event was stored whole, forever) and its status was kept and served whole.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from cloud.fleet import MAX_DEVICE_MESSAGE_BYTES
from cloud.registry import MAX_EVENTS_PER_DEVICE
from common import messages, topics
from common.mqtt import MqttLink
from tests.edge.agent_harness import ControlPlane


async def _until(predicate, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_a_device_cannot_grow_the_event_log_without_bound(mosquitto, tmp_path) -> None:
    device = f"dev-flood-{uuid.uuid4().hex[:6]}"
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        async with MqttLink(client_id=device, host=mosquitto.host, port=mosquitto.port) as evil:
            await evil.wait_connected(10)
            huge = messages.event(device, None, "failed", error="E" * 1_000_000)
            for _ in range(3):  # each far over any real event
                await evil.publish(topics.device_topic(device, "events"), huge)
            small = MAX_EVENTS_PER_DEVICE + 50
            for i in range(small):
                await evil.publish(
                    topics.device_topic(device, "events"), messages.event(device, None, f"s{i}")
                )
            last = f"s{small - 1}"
            await _until(lambda: any(e["stage"] == last for e in cp.registry.events(device, 5)))
        kept = cp.registry.events(device, limit=10 * MAX_EVENTS_PER_DEVICE)
        assert len(kept) <= MAX_EVENTS_PER_DEVICE  # the oldest went, the newest stay
        assert kept[0]["stage"] == last
        assert all(len(json.dumps(e)) <= MAX_DEVICE_MESSAGE_BYTES for e in kept)
        assert not any(e["stage"] == "failed" for e in kept)  # the huge ones were dropped


async def test_an_oversized_status_is_not_stored(mosquitto, tmp_path) -> None:
    device = f"dev-fat-{uuid.uuid4().hex[:6]}"
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        async with MqttLink(client_id=device, host=mosquitto.host, port=mosquitto.port) as evil:
            await evil.wait_connected(10)
            doc = json.loads(messages.status(device, online=True))
            doc["hardware"] = {"junk": "x" * 2_000_000}
            await evil.publish(topics.device_topic(device, "status"), json.dumps(doc).encode())
            marker = messages.event(device, None, "marker")
            await evil.publish(topics.device_topic(device, "events"), marker)
            await _until(lambda: bool(cp.registry.events(device)))
            await asyncio.sleep(0.5)  # the status, sent first, has had its turn
        assert [d for d in cp.registry.devices() if d["device_id"] == device] == []
