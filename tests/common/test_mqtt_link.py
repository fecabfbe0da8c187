"""MqttLink against a real Mosquitto: QoS 1 round trip, retained status, will, reconnect."""

from __future__ import annotations

import asyncio

import pytest

from common.mqtt import MqttError, MqttLink, Will


def link(broker, client_id: str, **kw) -> MqttLink:
    return MqttLink(client_id=client_id, host=broker.host, port=broker.port, **kw)


async def test_publish_subscribe_roundtrip(mosquitto) -> None:
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    async with link(mosquitto, "rt-sub") as sub, link(mosquitto, "rt-pub") as pub:
        await sub.wait_connected(5)
        await pub.wait_connected(5)
        sub.subscribe("fogline/v1/test/+", lambda t, p: got.put_nowait((t, p)))
        await asyncio.sleep(0.2)
        await pub.publish("fogline/v1/test/a", b"\x00binary\xff", qos=1)
        topic, payload = await asyncio.wait_for(got.get(), 5)
    assert topic == "fogline/v1/test/a"
    assert payload == b"\x00binary\xff"


async def test_will_marks_client_offline(mosquitto) -> None:
    got: asyncio.Queue[bytes] = asyncio.Queue()
    will = Will("fogline/v1/test/will", b"offline", retain=False)
    async with link(mosquitto, "will-watch") as watcher:
        await watcher.wait_connected(5)
        watcher.subscribe("fogline/v1/test/will", lambda t, p: got.put_nowait(p))
        await asyncio.sleep(0.2)
        dying = link(mosquitto, "will-dying", will=will, keepalive=1)
        await dying.__aenter__()
        await dying.wait_connected(5)
        # Drop the socket without DISCONNECT, as a crash would.
        dying._client.socket().close()
        await dying.close(graceful=False)
        assert await asyncio.wait_for(got.get(), 10) == b"offline"


async def test_publish_while_broker_down_raises_then_recovers(tmp_path) -> None:
    from tests.conftest import Mosquitto

    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        async with link(broker, "flaky") as client:
            await client.wait_connected(5)
            broker.stop()
            await asyncio.sleep(0.5)
            with pytest.raises(MqttError):
                await client.publish("fogline/v1/test/x", b"1")
            broker.start()
            await client.wait_connected(15)
            await client.publish("fogline/v1/test/x", b"2")
    finally:
        broker.stop()


async def test_retained_messages_can_be_refused_per_subscription(mosquitto) -> None:
    """``retained=False``: what the broker replays from its retained store on subscribing
    is dropped (anyone may have left it there); live messages, retained or not, still come."""
    live_only: asyncio.Queue[bytes] = asyncio.Queue()
    everything: asyncio.Queue[bytes] = asyncio.Queue()
    topic = "fogline/v1/test/retained-chunks"
    async with link(mosquitto, "ret-pub") as pub:
        await pub.wait_connected(5)
        await pub.publish(topic, b"planted", retain=True)
        try:
            async with link(mosquitto, "ret-sub") as sub, link(mosquitto, "ret-all") as other:
                await sub.wait_connected(5)
                await other.wait_connected(5)
                sub.subscribe(topic, lambda t, p: live_only.put_nowait(p), retained=False)
                other.subscribe(topic, lambda t, p: everything.put_nowait(p))
                assert await asyncio.wait_for(everything.get(), 5) == b"planted"
                await asyncio.sleep(0.2)  # sub's copy of "planted" has come (and gone) too
                await pub.publish(topic, b"live", retain=True)  # live: forwarded, flag cleared
                assert await asyncio.wait_for(everything.get(), 5) == b"live"
                assert await asyncio.wait_for(live_only.get(), 5) == b"live"
                assert live_only.empty()
        finally:
            await pub.publish(topic, b"", retain=True)


async def test_a_slow_handler_holds_the_backlog_at_the_broker_not_in_memory(mosquitto) -> None:
    """paho's thread waits while the loop is behind: the undelivered messages stay at the
    broker (one copy for every subscriber) instead of piling up in each client."""
    from common.mqtt import MAX_BACKLOG

    got: list[bytes] = []
    most = 0
    async with link(mosquitto, "bp-sub") as sub, link(mosquitto, "bp-pub") as pub:
        await sub.wait_connected(5)
        await pub.wait_connected(5)

        async def slow(_topic: str, payload: bytes) -> None:
            nonlocal most
            most = max(most, sub._backlog)
            got.append(payload)
            await asyncio.sleep(0.005)

        sub.subscribe("fogline/v1/test/bp", slow)
        await asyncio.sleep(0.2)
        sent = [str(i).encode() for i in range(4 * MAX_BACKLOG)]
        await asyncio.gather(*(pub.publish("fogline/v1/test/bp", p) for p in sent))
        async with asyncio.timeout(60):
            while len(got) < len(sent):
                await asyncio.sleep(0.05)
    assert got == sent  # every one, in order
    assert most <= MAX_BACKLOG + 1  # never the whole burst
