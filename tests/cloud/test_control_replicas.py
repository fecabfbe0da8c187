"""Control-plane replicas on a secured broker: each has its own login.

Mosquitto from ``fogline broker config`` forces client id = username, so two
replicas on one login take each other's session over and over. The config
makes one login per replica; a link that keeps being dropped says why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import stat
from pathlib import Path

import pytest

from cloud.enrollment import (
    AgentSettings,
    control_credentials,
    enroll_device,
    write_broker_config,
)
from common import broker_auth, topics
from common.errors import InvalidInputError
from common.mqtt import MqttLink
from fogline.broker import BrokerSecurity, start_broker
from tests.fogline_cli import fogline

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None, reason="shared subscriptions need Mosquitto"
)


def test_broker_config_makes_one_login_per_replica(tmp_path: Path) -> None:
    workdir = tmp_path / "control"
    files = write_broker_config(workdir, tmp_path / "broker", control_replicas=3)
    logins = [control_credentials(workdir, replica=r) for r in (1, 2, 3)]
    assert [c.username for c in logins] == [
        "_fogline-control",
        "_fogline-control-2",
        "_fogline-control-3",
    ]
    assert len({c.password for c in logins}) == 3
    hashes = broker_auth.parse_password_file(files.password_file.read_text())
    acl = broker_auth.parse_acl(files.acl_file.read_text())
    for login in logins:
        assert broker_auth.verify_password(login.password, hashes[login.username])
        assert acl[login.username] == broker_auth.control_grants()
    for name in ("broker-control.json", "broker-control-2.json", "broker-control-3.json"):
        assert stat.S_IMODE((workdir / name).stat().st_mode) == 0o600
    # Regenerating keeps the logins replicas already hold; fewer replicas drop the rest.
    write_broker_config(workdir, tmp_path / "broker", control_replicas=2)
    assert control_credentials(workdir, replica=2) == logins[1]
    hashes = broker_auth.parse_password_file(files.password_file.read_text())
    assert "_fogline-control-3" not in hashes
    for bad in (0, -1, 65):
        with pytest.raises(InvalidInputError, match="control-replicas"):
            write_broker_config(workdir, tmp_path / "broker", control_replicas=bad)


def test_serve_without_its_replica_login_says_how_to_make_it(tmp_path: Path) -> None:
    workdir = tmp_path / "control"
    write_broker_config(workdir, tmp_path / "broker")  # replica 1 only
    done = fogline("control", "serve", "--workdir", str(workdir), "--replica", "2")
    assert done.returncode == 1
    assert "--control-replicas 2" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    bad = fogline("control", "serve", "--workdir", str(workdir), env={"FOGLINE_REPLICA": "x"})
    assert bad.returncode == 2 and "--replica" in bad.stderr, bad.stderr


def _link(broker, username: str, password: str) -> MqttLink:
    return MqttLink(
        client_id=username, host=broker.host, port=broker.port,
        username=username, password=password, persistent_session=True,
    )  # fmt: skip


async def test_replicas_with_their_own_logins_share_device_events(tmp_path: Path) -> None:
    workdir = tmp_path / "control"
    device = enroll_device(workdir, "dev-1", AgentSettings())
    files = write_broker_config(workdir, tmp_path / "config", control_replicas=2)
    security = BrokerSecurity(files.password_file, files.acl_file)
    logins = [control_credentials(workdir, replica=r) for r in (1, 2)]
    shared = topics.shared(topics.all_devices_filter("events"), "control")
    with start_broker("mosquitto", workdir=tmp_path / "run", security=security) as broker:
        seen: list[list[int]] = [[], []]
        replicas = [_link(broker, c.username, c.password) for c in logins]
        for mine, link in zip(seen, replicas, strict=True):
            link.subscribe(shared, lambda _t, p, mine=mine: mine.append(json.loads(p)["n"]))
        dev = _link(broker, device["broker_username"], device["broker_password"])
        async with replicas[0], replicas[1], dev:
            for link in (*replicas, dev):
                await link.wait_connected(10)
            await asyncio.sleep(0.5)  # both share subscriptions are in place
            for n in range(40):
                await dev.publish(
                    topics.device_topic("dev-1", "events"), json.dumps({"n": n}).encode()
                )
            async with asyncio.timeout(10):
                while len(seen[0]) + len(seen[1]) < 40:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            assert sorted(seen[0] + seen[1]) == list(range(40))  # each event once
            assert seen[0] and seen[1], seen  # and the broker shared them
            assert all(link.connected.is_set() for link in replicas)
            assert [link._quick_drops for link in replicas] == [0, 0]


async def test_two_processes_on_one_login_are_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    workdir = tmp_path / "control"
    files = write_broker_config(workdir, tmp_path / "config")
    security = BrokerSecurity(files.password_file, files.acl_file)
    login = control_credentials(workdir)
    caplog.set_level(logging.WARNING, logger="common.mqtt")
    with start_broker("mosquitto", workdir=tmp_path / "run", security=security) as broker:
        first = _link(broker, login.username, login.password)
        second = _link(broker, login.username, login.password)
        async with first, second:
            async with asyncio.timeout(30):
                while "--control-replicas" not in caplog.text:
                    await asyncio.sleep(0.1)
    assert "_fogline-control" in caplog.text


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_a_device_takes_no_replica_login_session_or_topic(kind: str, tmp_path: Path) -> None:
    """Red team (held): replica 2's login, as a device would try it: its client id, its
    username with the device's password, and the topics only replicas may use."""
    from tests.test_broker_auth import Client

    workdir = tmp_path / "control"
    device = enroll_device(workdir, "dev-1", AgentSettings())
    files = write_broker_config(workdir, tmp_path / "config", control_replicas=2)
    replica = control_credentials(workdir, replica=2)
    security = BrokerSecurity(files.password_file, files.acl_file)
    login = (device["broker_username"], device["broker_password"])
    with start_broker(kind, workdir=tmp_path / "run", security=security) as broker:  # type: ignore[arg-type]
        made: list[Client] = []
        try:
            two = Client(broker, replica.username, (replica.username, replica.password))
            made.append(two)
            two.connected()
            assert two.subscribe(topics.all_devices_filter("events"))
            requests = topics.repair_filter("requests")
            assert two.subscribe(requests)
            for who in (replica.username, "anything"):
                thief = Client(broker, who, login, clean_session=False)
                made.append(thief)
                thief.connected()  # as itself: the broker forces client id = username
                thief.subscribe(requests)  # Mosquitto grants it, then delivers nothing
                thief.publish(topics.repair_topic("ab" * 32, "requests", "dev-1"), who.encode())
                assert two.receive().payload == who.encode()
                thief.publish(topics.device_topic("dev-1", "events"), who.encode())
                assert two.receive().payload == who.encode()
                assert thief.drain() == []
            stolen = Client(broker, replica.username, (replica.username, device["broker_password"]))
            made.append(stolen)
            assert stolen.connack().is_failure  # type: ignore[attr-defined]
            assert two.paho.is_connected() and two.connacks.empty()  # never taken over
        finally:
            for client in made:
                client.close()
