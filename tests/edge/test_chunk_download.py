"""One artifact's download over a real broker, the control plane played by a plain client:
what a device asks for, on which topic, and how often."""

from __future__ import annotations

import asyncio
import json
import os
import time

from common import chunking, topics
from common.mqtt import MqttLink
from edge.chunk_download import ChunkDownload

CHUNK = 1024
TIMEOUT_S = 1.0  # the device's quiet spell


async def _noop(_: str) -> None:
    return None


async def test_a_device_asks_on_its_own_topic_for_what_it_still_lacks(mosquitto, tmp_path):
    """Each request names exactly the missing chunks, goes on the device's own request
    topic, and comes only after a whole quiet spell without chunks."""
    data = os.urandom(6 * CHUNK)
    digest = "ab" * 32
    chunks = [c.encode() for c in chunking.split(data, CHUNK)]
    requests: asyncio.Queue[tuple[float, list[int]]] = asyncio.Queue()

    def on_request(_topic: str, payload: bytes) -> None:
        requests.put_nowait((time.monotonic(), json.loads(payload)["missing"]))

    async with (
        MqttLink(client_id="control", host=mosquitto.host, port=mosquitto.port) as control,
        MqttLink(client_id="dev-s", host=mosquitto.host, port=mosquitto.port) as device,
    ):
        await control.wait_connected(5)
        await device.wait_connected(5)
        control.subscribe(topics.repair_topic(digest, "requests", "dev-s"), on_request)
        download = ChunkDownload(
            device,
            "dev-s",
            digest,
            len(data),
            CHUNK,
            None,
            chunk_timeout_s=TIMEOUT_S,
            on_rejected=_noop,
        )
        subscribed = asyncio.Event()

        async def started() -> None:
            subscribed.set()

        running = asyncio.create_task(download.run(started))
        await subscribed.wait()
        # A broker takes one client's SUBSCRIBEs in order: once a later one delivers,
        # the download's are in place too.
        probed = asyncio.Event()
        device.subscribe("probe/dev-s", lambda *_: probed.set())
        async with asyncio.timeout(10):
            while not probed.is_set():
                await control.publish("probe/dev-s", b"")
                await asyncio.sleep(0.05)
        for payload in chunks[:3]:
            await control.publish(topics.artifact_topic(digest, "chunks"), payload)
        _, first = await asyncio.wait_for(requests.get(), 10)
        assert first == [3, 4, 5]
        repairs = topics.repair_topic(digest, "repairs", "dev-s")
        await control.publish(repairs, chunks[3])  # a partial answer
        answered = time.monotonic()
        asked, second = await asyncio.wait_for(requests.get(), 10)
        assert second == [4, 5]
        # not while chunks were still coming (the margin: the PUBACK timing ``answered``
        # may come after the device already had the chunk)
        assert asked - answered >= 0.5 * TIMEOUT_S
        for payload in chunks[4:]:
            await control.publish(repairs, payload)
        assert await asyncio.wait_for(running, 10) == data
