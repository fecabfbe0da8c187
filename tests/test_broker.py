"""Both brokers that ``start_broker`` can run do what Fogline needs of MQTT 3.1.1.

Real brokers, real paho clients: QoS 1 delivery, retained status for late
subscribers, and the last will when an agent dies without a DISCONNECT.
"""

from __future__ import annotations

import queue
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fogline.broker import BrokerProcess, BrokerStartError, start_broker

WAIT_S = 5.0

KINDS = [
    pytest.param(
        "mosquitto",
        marks=pytest.mark.skipif(shutil.which("mosquitto") is None, reason="no mosquitto binary"),
    ),
    "amqtt",
]


class Client:
    """A paho client whose received messages land in a queue."""

    def __init__(self, broker: BrokerProcess, client_id: str, *, clean_session: bool = True):
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.paho = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=clean_session,
        )
        self.paho.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.paho.connect(broker.host, broker.port, keepalive=10)
        self.paho.loop_start()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        granted: queue.Queue[object] = queue.Queue()
        self.paho.on_subscribe = lambda _c, _u, _mid, codes, _p: granted.put(codes)
        self.paho.subscribe(topic, qos)
        codes = granted.get(timeout=WAIT_S)
        assert not any(code.is_failure for code in codes), codes  # type: ignore[attr-defined]

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=WAIT_S)  # QoS 1: returns once the PUBACK is in
        assert info.is_published()

    def receive(self) -> paho.MQTTMessage:
        return self.messages.get(timeout=WAIT_S)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture(scope="module", params=KINDS)
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    with start_broker(request.param, workdir=tmp_path_factory.mktemp(request.param)) as b:
        yield b


@pytest.fixture
def clients(broker: BrokerProcess, request: pytest.FixtureRequest) -> Iterator[list[Client]]:
    made = [Client(broker, f"{request.node.name}-{i}") for i in range(2)]
    yield made
    for client in made:
        client.close()


def test_url_and_kind(broker: BrokerProcess) -> None:
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert broker.kind in ("mosquitto", "amqtt")
    assert broker.port > 0


def test_qos1_roundtrip(clients: list[Client]) -> None:
    sub, pub = clients
    sub.subscribe("fogline-test/qos1/#")
    for i in range(3):
        pub.publish(f"fogline-test/qos1/{i}", f"payload {i}".encode())
    got = [sub.receive() for _ in range(3)]
    assert [m.topic for m in got] == [f"fogline-test/qos1/{i}" for i in range(3)]
    assert [m.payload for m in got] == [f"payload {i}".encode() for i in range(3)]
    assert {m.qos for m in got} == {1}


def test_retained_message_reaches_late_subscriber(clients: list[Client]) -> None:
    late, pub = clients
    pub.publish("fogline-test/retained", b"online", retain=True)
    late.subscribe("fogline-test/retained")
    msg = late.receive()
    assert (msg.topic, msg.payload, msg.retain) == ("fogline-test/retained", b"online", True)


def test_no_retained_messages_for_other_clients_subscriptions(
    broker: BrokerProcess, clients: list[Client], request: pytest.FixtureRequest
) -> None:
    # amqtt 0.12.1 sends a new client the retained messages of every filter *anyone*
    # holds; fogline.broker patches that out. The first message must be the newcomer's own.
    holder, pub = clients
    pub.publish("fogline-test/leak/status", b"someone else's", retain=True)
    holder.subscribe("fogline-test/leak/#")
    assert holder.receive().payload == b"someone else's"
    newcomer = Client(broker, f"{request.node.name}-newcomer")
    try:
        newcomer.subscribe("fogline-test/leak-other")
        pub.publish("fogline-test/leak-other", b"mine")
        assert newcomer.receive().payload == b"mine"
    finally:
        newcomer.close()


def test_persistent_session_gets_qos1_sent_while_offline(
    broker: BrokerProcess, clients: list[Client], request: pytest.FixtureRequest
) -> None:
    # An agent that was offline must still get its QoS 1 commands (amqtt's own anonymous
    # auth would drop them; fogline.broker admits clients as non-anonymous).
    _, pub = clients
    client_id = f"{request.node.name}-persistent"
    agent = Client(broker, client_id, clean_session=False)
    agent.subscribe("fogline-test/commands")
    agent.close()
    time.sleep(0.3)  # let the broker see the DISCONNECT before the publish below
    pub.publish("fogline-test/commands", b"deploy")
    agent = Client(broker, client_id, clean_session=False)
    try:
        msg = agent.receive()
        assert (msg.topic, msg.payload, msg.qos) == ("fogline-test/commands", b"deploy", 1)
    finally:
        agent.close()


# A client that connects with a will, says READY, and waits to be killed.
_DYING_CLIENT = textwrap.dedent(
    """
    import sys, threading
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ready = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="doomed", protocol=paho.MQTTv311)
    c.will_set(topic, b"offline", qos=1, retain=True)
    c.on_connect = lambda *_: ready.set()
    c.connect(host, port, keepalive=60)
    c.loop_start()
    ready.wait(10)
    print("READY", flush=True)
    threading.Event().wait()
    """
)


def test_last_will_on_abrupt_death(broker: BrokerProcess, clients: list[Client]) -> None:
    watcher, _ = clients
    topic = "fogline-test/devices/doomed/status"
    watcher.subscribe(topic)
    child = subprocess.Popen(
        [sys.executable, "-c", _DYING_CLIENT, broker.host, str(broker.port), topic],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "READY"
        assert watcher.messages.empty()
        child.kill()  # SIGKILL: the socket closes with no DISCONNECT, so the will must fire
    finally:
        child.kill()
        child.wait()
    msg = watcher.receive()
    assert (msg.topic, msg.payload) == (topic, b"offline")


@pytest.mark.parametrize("kind", KINDS)
def test_stop_closes_port(kind: str, tmp_path: Path) -> None:
    b = start_broker(kind, workdir=tmp_path)  # type: ignore[arg-type]
    assert b.running()
    b.stop()
    assert not b.running()
    with pytest.raises(OSError), socket.create_connection((b.host, b.port), timeout=1):
        pass
    b.stop()  # a second stop is harmless


def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerStartError, match="amqtt broker on port") as err:
            start_broker("amqtt", port=port, workdir=tmp_path, timeout=10)
    assert err.value.stderr_tail  # the broker's own words about the failure


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="no mosquitto binary")
def test_command_queued_for_an_offline_device_survives_a_broker_restart(tmp_path: Path) -> None:
    """Issue 8: the plain Mosquitto config said ``persistence false``.

    A QoS 1 command queued at the broker for an offline agent (persistent session)
    was lost when the broker restarted; README promises it waits for the device.
    """
    workdir = tmp_path / "broker"
    with start_broker("mosquitto", workdir=workdir) as first:
        port = first.port
        agent = Client(first, "cam-queued", clean_session=False)
        agent.subscribe("fogline-test/devices/cam-queued/commands")
        agent.close()
        time.sleep(0.3)  # the broker sees the DISCONNECT before the publish
        control = Client(first, "control-queued")
        control.publish("fogline-test/devices/cam-queued/commands", b"deploy v2")
        control.close()
    # The same port and data dir, a new broker process.
    with start_broker("mosquitto", port=port, workdir=workdir) as second:
        agent = Client(second, "cam-queued", clean_session=False)
        try:
            msg = agent.receive()
            assert (msg.topic, msg.payload) == (
                "fogline-test/devices/cam-queued/commands",
                b"deploy v2",
            )
        finally:
            agent.close()


def test_free_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    """A picked port cannot be taken by some client's connect() before the child binds it."""
    import socket

    from fogline.broker import _ephemeral_range, free_port

    low, _ = _ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert 20000 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_ports_stay_in_fogline_port_range_and_are_not_handed_out_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parallel test workers each get a slice of ports (``FOGLINE_PORT_RANGE``): a pick
    stays in it, and a port this process handed out is not handed out again soon."""
    from collections import deque

    from fogline import broker
    from fogline.broker import PORT_RANGE_ENV, free_port

    monkeypatch.setattr(broker, "_recent_ports", deque(maxlen=256))
    monkeypatch.setenv(PORT_RANGE_ENV, "21000-21039")
    picked = [free_port() for _ in range(20)]
    assert all(21000 <= port <= 21039 for port in picked), picked
    assert len(set(picked)) == len(picked), picked
    for bad in ("9-2", "x", "0-10", "1000-70000"):
        monkeypatch.setenv(PORT_RANGE_ENV, bad)
        with pytest.raises(ValueError, match=PORT_RANGE_ENV):
            free_port()
