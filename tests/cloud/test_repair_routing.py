"""Where repairs go, over a real broker and a real control plane: to the device that
asked, on its own topic, and not to every device downloading the artifact."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import paho.mqtt.client as paho
import pytest

from common import chunking, topics
from common.messages import chunk_request
from common.mqtt import MqttLink
from tests.edge.agent_harness import ControlPlane, share_store
from tests.test_broker_auth import _secure_broker

QUIET_S = 1.0  # time for anything more the control plane would send to arrive


class Listener:
    """A plain MQTT client that records (topic, chunk index) of what it receives."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.got: list[tuple[str, int]] = []
        self.probed = False

    def on(self, topic_filter: str) -> None:
        def record(topic: str, payload: bytes) -> None:
            if not topic.endswith("/probe"):  # ``ready``'s own messages
                self.got.append((topic, chunking.decode(payload).index))
            else:
                self.probed = True

        self.link.subscribe(topic_filter, record, retained=False)

    async def ready(self, probe: MqttLink, topic: str) -> None:
        """Until a message ``probe`` sends on ``topic`` arrives: the SUBSCRIBEs are in."""
        payload = next(chunking.split(b"probe", 64)).encode()
        async with asyncio.timeout(10):
            while not self.probed:
                await probe.publish(topic, payload)
                await asyncio.sleep(0.1)


async def until(done, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not done():
            await asyncio.sleep(0.05)


async def test_a_repair_goes_to_the_device_that_asked_and_no_other(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        v1 = cp.publish_toy(tmp_path, "1", seed=21)
        digest = v1.artifact_digest
        assert chunking.chunk_count(v1.artifact_size, 1024) > 3
        async with (
            MqttLink(client_id="spy", host=mosquitto.host, port=mosquitto.port) as spy_link,
            MqttLink(client_id="dev-a", host=mosquitto.host, port=mosquitto.port) as asker,
        ):
            spy = Listener(spy_link)
            spy.on(topics.artifact_topic(digest, "chunks"))  # what every device would get
            spy.on(topics.repair_filter("repairs"))  # and every device's own repairs
            await spy_link.wait_connected(5)
            await asker.wait_connected(5)
            await spy.ready(asker, topics.repair_topic(digest, "repairs", "probe"))
            await asker.publish(
                topics.repair_topic(digest, "requests", "dev-a"),
                chunk_request("dev-a", digest, [0, 2]),
            )
            await until(lambda: len(spy.got) >= 2)
            await asyncio.sleep(QUIET_S)  # anything more would have come by now
        mine = topics.repair_topic(digest, "repairs", "dev-a")
        assert sorted(spy.got) == [(mine, 0), (mine, 2)]
        assert cp.rollouts.stats["chunks_repaired_unicast"] == 2
        assert cp.rollouts.stats["chunks_broadcast"] == 0


async def test_a_request_naming_another_device_is_dropped(mosquitto, tmp_path) -> None:
    """The topic's device id is the broker's; a payload naming another is not served."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        v1 = cp.publish_toy(tmp_path, "1", seed=22)
        digest = v1.artifact_digest
        async with MqttLink(client_id="dev-a", host=mosquitto.host, port=mosquitto.port) as link:
            await link.wait_connected(5)
            spy = Listener(link)
            spy.on(topics.repair_filter("repairs"))
            await spy.ready(link, topics.repair_topic(digest, "repairs", "probe"))
            request = json.dumps({"device_id": "dev-b", "missing": [0]}).encode()
            await link.publish(topics.repair_topic(digest, "requests", "dev-a"), request)
            await until(lambda: cp.rollouts.stats["repair_requests_dropped"] >= 1)
            await asyncio.sleep(QUIET_S)  # a repair, had there been one, would be here
        assert spy.got == []
        assert cp.rollouts.stats["repair_requests_dropped"] == 1
        assert cp.rollouts.stats["chunks_repaired"] == 0


async def test_two_replicas_serve_each_repair_request_once(
    mosquitto, tmp_path, postgres_url
) -> None:
    """Replicas in one share group get each request from the broker once ($share/...),
    so a device is not sent its chunks by every replica."""
    first, second = tmp_path / "a", tmp_path / "b"
    shared = {"database": postgres_url, "share_group": "control"}
    async with ControlPlane(first, mosquitto, **shared) as a:
        v1 = a.publish_toy(tmp_path, "1", seed=23)
        share_store(first, second)
        async with (
            ControlPlane(second, mosquitto, **shared) as b,
            MqttLink(client_id="devices", host=mosquitto.host, port=mosquitto.port) as link,
        ):
            await link.wait_connected(5)
            await asyncio.sleep(0.2)
            for k in range(6):
                device = f"dev-{k}"
                await link.publish(
                    topics.repair_topic(v1.artifact_digest, "requests", device),
                    chunk_request(device, v1.artifact_digest, [0, 1]),
                )
            replicas = [a.rollouts.stats, b.rollouts.stats]
            async with asyncio.timeout(10):
                while sum(s["chunks_repaired_unicast"] for s in replicas) < 12:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(QUIET_S)  # anything a second replica would add
            assert sum(s["chunks_repaired_unicast"] for s in replicas) == 12


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="no mosquitto binary")
async def test_a_device_in_the_replicas_share_group_steals_no_request(tmp_path) -> None:
    """Red team: Mosquitto grants a device's login any ``$share/GROUP/...`` filter and
    checks the ACL only on delivery; a device that joined the replicas' group (the
    operator's ``--share-group`` name) took its turn in the round robin, and every
    request the broker handed it was dropped. The group now carries a tag only the
    signing key can make."""
    broker, logins, _ = _secure_broker("mosquitto", tmp_path)
    user, password = logins.control
    with broker:
        async with ControlPlane(
            tmp_path / "control",
            broker,
            share_group="control",
            broker_username=user,
            broker_password=password,
        ) as cp:
            digest = cp.publish_toy(tmp_path, "1", seed=24).artifact_digest
            at = {"host": broker.host, "port": broker.port}
            thief_login, honest_login = logins.devices["device-1"], logins.devices["device-2"]
            async with (
                MqttLink(
                    client_id="t", username=thief_login[0], password=thief_login[1], **at
                ) as thief,
                MqttLink(
                    client_id="h", username=honest_login[0], password=honest_login[1], **at
                ) as honest,
            ):
                await thief.wait_connected(5)
                await honest.wait_connected(5)
                for group in ("control", "fogline"):
                    thief.subscribe(
                        topics.shared(topics.repair_filter("requests"), group), lambda *_: None
                    )
                await asyncio.sleep(0.3)  # the subscriptions are in place
                for k in range(2):  # the device's burst; the broker alternates between members
                    await honest.publish(
                        topics.repair_topic(digest, "requests", "device-2"),
                        chunk_request("device-2", digest, [k]),
                    )
                await until(lambda: cp.rollouts.stats["chunks_repaired_unicast"] >= 2, 30)


async def test_a_flood_from_one_device_does_not_crowd_out_another(mosquitto, tmp_path) -> None:
    """Red team: the request queue (64) was shared and each device's rate was checked
    only after its turn in it, so one device's login publishing as fast as it could
    filled the queue and other devices' requests were dropped. Now a device over its
    rate is turned away before it takes a slot."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        digest = cp.publish_toy(tmp_path, "1", seed=25).artifact_digest
        at = {"host": mosquitto.host, "port": mosquitto.port}
        async with (
            MqttLink(client_id="dev-b", **at) as honest,
        ):
            await honest.wait_connected(5)
            spy = Listener(honest)
            spy.on(topics.repair_topic(digest, "repairs", "dev-b"))
            probe = topics.repair_topic(digest, "repairs", "probe")
            spy.on(probe)
            await spy.ready(honest, probe)
            mine = topics.repair_topic(digest, "requests", "dev-a")
            request = chunk_request("dev-a", digest, [0])
            stop = threading.Event()

            def flooding() -> None:  # QoS 0 as fast as the socket takes them
                client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="flood")
                client.connect(mosquitto.host, mosquitto.port)
                client.loop_start()
                while not stop.is_set():
                    client.publish(mine, request, qos=0)
                client.disconnect()
                client.loop_stop()

            flooder = threading.Thread(target=flooding)
            flooder.start()
            try:
                await asyncio.sleep(0.5)  # the flood is on
                await honest.publish(
                    topics.repair_topic(digest, "requests", "dev-b"),
                    chunk_request("dev-b", digest, [1]),
                )
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                await asyncio.to_thread(flooder.join)
            # behind whatever part of the flood reached the control plane before it
            await until(lambda: spy.got, timeout=60)
            await asyncio.sleep(QUIET_S)
        assert spy.got == [(topics.repair_topic(digest, "repairs", "dev-b"), 1)]
        stats = cp.rollouts.stats
        assert stats["chunks_repaired_unicast"] <= 2  # the flood got chunk 0 at most once
        assert stats["repair_requests_limited"] > 100
