"""The generated broker config, tried as an attacker would, on both brokers.

Real brokers started from the files ``fogline broker config`` writes
(Mosquitto with its ``mosquitto.conf``; the embedded amqtt with the same
password and ACL files), real paho clients with enrolled credentials. What
the ACL forbids is asserted where it matters: the message never arrives.
"""

from __future__ import annotations

import getpass
import json
import os
import queue
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud.enrollment import (
    AgentSettings,
    control_credentials,
    enroll_device,
    revoke_device,
    write_broker_config,
)
from common import topics
from common.broker_auth import MAX_PACKET_SIZE, TlsFiles
from fogline.broker import BrokerProcess, BrokerSecurity, start_broker
from fogline.cli import main
from tests.conftest import free_port, wait_port
from tests.tls_certs import make_pki

WAIT_S = 5.0
QUIET_S = 0.7  # how long "never arrives" waits, after a later message did arrive
DIGEST = "ab" * 32

KINDS = [
    pytest.param(
        "mosquitto",
        marks=pytest.mark.skipif(shutil.which("mosquitto") is None, reason="no mosquitto binary"),
    ),
    "amqtt",
]


@dataclass(frozen=True)
class Logins:
    control: tuple[str, str]
    devices: dict[str, tuple[str, str]]


class Client:
    """A paho client whose CONNACK, SUBACKs and messages land in queues."""

    def __init__(
        self,
        broker: BrokerProcess,
        client_id: str,
        login: tuple[str, str] | None = None,
        *,
        clean_session: bool = True,
        ca: Path | None = None,
        will: str | None = None,
    ) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.connacks: queue.Queue[object] = queue.Queue()
        self.subacks: queue.Queue[list[object]] = queue.Queue()
        self.paho = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=clean_session,
        )
        if login is not None:
            self.paho.username_pw_set(*login)
        if ca is not None:
            self.paho.tls_set(ca_certs=str(ca))
        if will is not None:
            self.paho.will_set(will, b"offline", qos=1, retain=True)
        self.paho.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.put(rc)
        self.paho.on_subscribe = lambda _c, _u, _m, codes, _p: self.subacks.put(codes)
        self.paho.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.paho.connect(broker.host, broker.port, keepalive=10)
        self.paho.loop_start()

    def connack(self) -> object:
        return self.connacks.get(timeout=WAIT_S)

    def connected(self) -> Client:
        rc = self.connack()
        assert not rc.is_failure, rc  # type: ignore[attr-defined]
        return self

    def subscribe(self, topic: str) -> bool:
        """True if granted; False if the broker refused the filter."""
        self.paho.subscribe(topic, 1)
        codes = self.subacks.get(timeout=WAIT_S)
        return not any(code.is_failure for code in codes)  # type: ignore[attr-defined]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=WAIT_S)

    def receive(self) -> paho.MQTTMessage:
        return self.messages.get(timeout=WAIT_S)

    def drain(self, seconds: float = QUIET_S) -> list[tuple[str, bytes]]:
        time.sleep(seconds)
        out = []
        while not self.messages.empty():
            msg = self.messages.get_nowait()
            out.append((msg.topic, bytes(msg.payload)))
        return out

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def _secure_broker(
    kind: str, root: Path, tls: bool = False
) -> tuple[BrokerProcess, Logins, Path | None]:
    """Enroll two devices, write the broker files, start the broker with them."""
    workdir = root / "control"
    devices = {}
    for device_id in ("device-1", "device-2"):
        config = enroll_device(workdir, device_id, AgentSettings())
        devices[device_id] = (config["broker_username"], config["broker_password"])
    control = control_credentials(workdir)
    tls_files = None
    if tls:
        pki = make_pki(root / "pki")
        tls_files = TlsFiles(pki.cert, pki.key, pki.ca)
    files = write_broker_config(workdir, root / "broker-config", tls=tls_files)
    broker = start_broker(
        kind,  # type: ignore[arg-type]
        workdir=root / "broker",
        security=BrokerSecurity(files.password_file, files.acl_file, tls_files),
    )
    return (
        broker,
        Logins((control.username, control.password), devices),
        (tls_files.ca if tls_files else None),
    )


@pytest.fixture(scope="module", params=KINDS)
def secured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BrokerProcess, Logins]]:
    broker, logins, _ = _secure_broker(request.param, tmp_path_factory.mktemp(request.param))
    with broker:
        yield broker, logins


@pytest.fixture
def opened(secured: tuple[BrokerProcess, Logins]) -> Iterator[list[Client]]:
    """Clients made by the test, closed afterwards."""
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def _client(made: list[Client], *args: object, **kw: object) -> Client:
    client = Client(*args, **kw)  # type: ignore[arg-type]
    made.append(client)
    return client


def test_anonymous_and_wrong_password_are_refused(secured, opened) -> None:
    broker, logins = secured
    user, password = logins.devices["device-1"]
    for login in (None, (user, password + "x"), ("device-9", password), ("", "")):
        rc = _client(opened, broker, "intruder", login).connack()
        assert rc.is_failure, login  # type: ignore[attr-defined]
    assert not _client(opened, broker, "ok", (user, password)).connack().is_failure  # type: ignore[attr-defined]


def test_device_reads_only_its_own_commands(secured, opened) -> None:
    broker, logins = secured
    control = _client(opened, broker, "control", logins.control).connected()
    spy = _client(opened, broker, "spy", logins.devices["device-1"]).connected()
    for wide in ("#", "fogline/v1/#", topics.all_devices_filter("commands")):
        spy.subscribe(wide)  # Mosquitto grants and filters, amqtt refuses: either way, nothing
    spy.subscribe(topics.device_topic("device-2", "commands"))
    assert spy.subscribe(topics.device_topic("device-1", "commands"))
    assert spy.subscribe(topics.artifact_topic(DIGEST, "chunks"))
    control.publish(topics.device_topic("device-2", "commands"), b"for device-2")
    control.publish(topics.device_topic("device-2", "status"), b"nothing to see")
    control.publish(topics.device_topic("device-1", "commands"), b"for device-1")
    got = spy.receive()
    assert (got.topic, got.payload) == (
        topics.device_topic("device-1", "commands"),
        b"for device-1",
    )
    assert spy.drain() == []


def test_device_cannot_write_another_devices_topics(secured, opened) -> None:
    broker, logins = secured
    control = _client(opened, broker, "control", logins.control).connected()
    for kind in ("status", "telemetry", "events"):
        assert control.subscribe(topics.all_devices_filter(kind))
    victim = _client(opened, broker, "victim", logins.devices["device-2"]).connected()
    assert victim.subscribe(topics.device_topic("device-2", "commands"))
    assert victim.subscribe(topics.artifact_topic(DIGEST, "chunks"))
    attacker = _client(opened, broker, "attacker", logins.devices["device-1"]).connected()
    for kind in ("status", "telemetry", "events"):
        attacker.publish(topics.device_topic("device-2", kind), b"forged", retain=kind == "status")
    attacker.publish(topics.device_topic("device-2", "commands"), b"forged command")
    attacker.publish(topics.artifact_topic(DIGEST, "chunks"), b"forged chunk", retain=True)
    attacker.publish(topics.device_topic("device-1", "events"), b"own event")
    got = control.receive()  # the attacker's own event, sent last, arrives...
    assert (got.topic, got.payload) == (topics.device_topic("device-1", "events"), b"own event")
    assert control.drain() == []  # ...and nothing it forged did
    control.publish(topics.device_topic("device-2", "commands"), b"real command")
    assert victim.receive().payload == b"real command"
    assert victim.drain() == []
    late = _client(opened, broker, "late", logins.control).connected()
    late.subscribe(topics.device_topic("device-2", "status"))
    assert late.drain() == []  # no forged retained status either


def test_device_may_write_its_own_topics_and_chunk_requests(secured, opened) -> None:
    broker, logins = secured
    control = _client(opened, broker, "control", logins.control).connected()
    assert control.subscribe(topics.repair_filter("requests"))
    assert control.subscribe(topics.all_devices_filter("telemetry"))
    device = _client(opened, broker, "device", logins.devices["device-2"]).connected()
    device.publish(topics.repair_topic(DIGEST, "requests", "device-1"), b"as another")
    device.publish(topics.repair_topic(DIGEST, "requests", "device-2"), b"[1, 2]")
    device.publish(topics.device_topic("device-2", "telemetry"), b"{}")
    assert [control.receive().payload for _ in range(2)] == [b"[1, 2]", b"{}"]
    assert control.drain() == []  # the request in another device's name never arrived


def test_repairs_reach_only_the_device_they_are_for(secured, opened) -> None:
    broker, logins = secured
    mine = _client(opened, broker, "mine", logins.devices["device-2"]).connected()
    assert mine.subscribe(topics.repair_filter("repairs", "device-2"))
    other = _client(opened, broker, "other", logins.devices["device-1"]).connected()
    other.subscribe(topics.repair_filter("repairs", "device-2"))  # granted, delivers nothing
    other.subscribe(topics.repair_filter("repairs"))
    other.publish(topics.repair_topic(DIGEST, "repairs", "device-2"), b"forged repair")
    control = _client(opened, broker, "control", logins.control).connected()
    control.publish(topics.repair_topic(DIGEST, "repairs", "device-2"), b"chunk 7")
    assert mine.receive().payload == b"chunk 7"
    assert mine.drain() == [] and other.drain() == []


def test_device_cannot_take_the_control_planes_client_id(secured, opened) -> None:
    broker, logins = secured
    control_id = "fogline-control-8000"
    control = _client(opened, broker, control_id, logins.control, clean_session=False)
    control.connected()
    assert control.subscribe(topics.all_devices_filter("events"))
    for clean in (False, True):
        thief = _client(opened, broker, control_id, logins.devices["device-1"], clean_session=clean)
        thief.connected()
        thief.publish(topics.device_topic("device-1", "events"), f"clean={clean}".encode())
        assert control.receive().payload == f"clean={clean}".encode()
    # A wrong password under the control plane's id does not end its session either.
    _client(opened, broker, control_id, (logins.control[0], "wrong")).connack()
    device = _client(opened, broker, "device", logins.devices["device-2"]).connected()
    device.publish(topics.device_topic("device-2", "events"), b"still listening")
    assert control.receive().payload == b"still listening"
    assert control.paho.is_connected()
    assert control.connacks.empty()  # never had to reconnect


@pytest.mark.parametrize("kind", KINDS)
def test_tls_listener(kind: str, tmp_path: Path) -> None:
    broker, logins, ca = _secure_broker(kind, tmp_path, tls=True)
    made: list[Client] = []
    with broker:
        assert broker.url.startswith("mqtts://")
        try:
            device = _client(made, broker, "d", logins.devices["device-1"], ca=ca).connected()
            assert device.subscribe(topics.device_topic("device-1", "commands"))
            control = _client(made, broker, "c", logins.control, ca=ca).connected()
            control.publish(topics.device_topic("device-1", "commands"), b"over tls")
            assert device.receive().payload == b"over tls"
            plain = _client(made, broker, "plain", logins.devices["device-2"])
            with pytest.raises(queue.Empty):
                plain.connack()  # plain TCP to a TLS listener: no CONNACK, ever
            other = make_pki(tmp_path / "other-ca", "other")
            with pytest.raises(OSError):  # ssl.SSLCertVerificationError
                Client(broker, "wrong-ca", logins.devices["device-2"], ca=other.ca)
        finally:
            for client in made:
                client.close()


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="no mosquitto binary")
def test_generated_mosquitto_conf_runs_as_written(tmp_path: Path) -> None:
    """``fogline broker config``'s own mosquitto.conf, started with ``mosquitto -c``."""
    workdir, out, port = tmp_path / "control", tmp_path / "broker", free_port()
    device = tmp_path / "device-1.json"
    argv = ["device", "enroll", "device-1", "--workdir", str(workdir), "--out", str(device)]
    assert main(argv) == 0
    argv = ["broker", "config", "--workdir", str(workdir), "--out", str(out)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--run-as", getpass.getuser()]
    assert main(argv) == 0
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(out / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    made: list[Client] = []
    try:
        wait_port("127.0.0.1", port)
        broker = SimpleNamespace(host="127.0.0.1", port=port)
        config = json.loads(device.read_text())
        login = (config["broker_username"], config["broker_password"])
        _client(made, broker, "device", login).connected()
        assert _client(made, broker, "anonymous").connack().is_failure  # type: ignore[attr-defined]
    finally:
        for client in made:
            client.close()
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("kind", KINDS)
def test_revoke_and_rotate_take_effect_on_reload(kind: str, tmp_path: Path) -> None:
    """Operator flow: revoke or re-enroll, regenerate the files, SIGHUP the broker."""
    broker, logins, _ = _secure_broker(kind, tmp_path)
    workdir = tmp_path / "control"
    made: list[Client] = []
    with broker:
        try:
            for login in logins.devices.values():
                _client(made, broker, "before", login).connected()
            revoke_device(workdir, "device-2")
            rotated = enroll_device(workdir, "device-1", AgentSettings())
            write_broker_config(workdir, tmp_path / "broker-config")
            os.kill(broker.pid, signal.SIGHUP)
            time.sleep(0.5)
            for login in (logins.devices["device-2"], logins.devices["device-1"]):
                assert _client(made, broker, "after", login).connack().is_failure  # type: ignore[attr-defined]
            new_login = (rotated["broker_username"], rotated["broker_password"])
            _client(made, broker, "rotated", new_login).connected()
        finally:
            for client in made:
                client.close()


def test_reconnecting_with_the_same_login_takes_the_session_over(secured, opened) -> None:
    """A device that reconnects before the broker noticed its old connection died."""
    broker, logins = secured
    control = _client(opened, broker, "control", logins.control).connected()
    assert control.subscribe(topics.all_devices_filter("status"))
    status = topics.device_topic("device-2", "status")
    first = Client(broker, "agent", logins.devices["device-2"], clean_session=False, will=status)
    opened.append(first)
    first.connected()
    assert first.subscribe(topics.device_topic("device-2", "commands"))
    first.paho.loop_stop()  # its socket stays open, unread: a connection that died quietly
    second = Client(broker, "agent", logins.devices["device-2"], clean_session=False, will=status)
    opened.append(second)
    second.connected()
    control.publish(topics.device_topic("device-2", "commands"), b"after the takeover")
    assert second.receive().payload == b"after the takeover"
    assert control.drain() == []  # no "offline" will for a device that is online


def test_a_packet_over_the_size_limit_is_refused_on_both_brokers(secured, opened) -> None:
    """Red team: Mosquitto runs with ``max_packet_size`` (4 MiB + change); the embedded
    amqtt broker had no limit, so one device's login could push a 64 MiB message through
    it to the control plane (and any size into the broker's memory)."""
    broker, logins = secured
    control = _client(opened, broker, "control", logins.control).connected()
    assert control.subscribe(topics.all_devices_filter("events"))
    big = _client(opened, broker, "big", logins.devices["device-1"]).connected()
    big.paho.publish(topics.device_topic("device-1", "events"), b"x" * (64 * 1024**2), qos=1)
    time.sleep(2.0)
    marker = _client(opened, broker, "marker", logins.devices["device-2"]).connected()
    marker.publish(topics.device_topic("device-2", "events"), b"after")
    first = control.receive()
    sizes = [len(first.payload), *(len(payload) for _topic, payload in control.drain())]
    assert max(sizes) <= MAX_PACKET_SIZE, sizes


def test_shared_subscriptions_follow_the_acl(secured, opened) -> None:
    """Replicas subscribe as ``$share/GROUP/...``: the control login reads device events
    that way; a device's login gets no one else's events through a share group."""
    broker, logins = secured
    if broker.kind != "mosquitto":
        pytest.skip("amqtt has no shared subscriptions; replicas need Mosquitto")
    shared = topics.shared(topics.all_devices_filter("events"), "control")
    control = _client(opened, broker, "control", logins.control).connected()
    assert control.subscribe(shared)
    spy = _client(opened, broker, "spy", logins.devices["device-1"]).connected()
    spy.subscribe(topics.shared(topics.all_devices_filter("events"), "spies"))
    device = _client(opened, broker, "device", logins.devices["device-2"]).connected()
    device.publish(topics.device_topic("device-2", "events"), b"an event")
    got = control.receive()
    assert (got.topic, got.payload) == (topics.device_topic("device-2", "events"), b"an event")
    assert spy.drain() == []
