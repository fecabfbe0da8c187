"""Fleet messages are stored in batches: one transaction, each message in a savepoint.

A burst of statuses, events and telemetry from several devices is stored whole
and in order, except the one message that is refused, which undoes only itself;
and a nested transaction on either database rolls back alone.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from cloud.database import Database
from common import messages, topics
from common.mqtt import MqttLink
from tests.edge.agent_harness import ControlPlane


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "db.sqlite")
    return request.getfixturevalue("postgres_url")


def test_a_failed_nested_transaction_undoes_only_itself(database) -> None:
    db = Database(database)
    db.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    with db.transaction():
        db.execute("INSERT INTO t VALUES ('a')")
        with pytest.raises(RuntimeError), db.transaction():
            db.execute("INSERT INTO t VALUES ('b')")
            raise RuntimeError("refused")
        with db.transaction():
            db.execute("INSERT INTO t VALUES ('c')")
            with pytest.raises(Exception), db.transaction():  # noqa: B017 (either driver)
                db.execute("INSERT INTO t VALUES ('a')")  # a real SQL error, in a savepoint
        db.execute("INSERT INTO t VALUES ('d')")  # the outer transaction is still usable
    assert sorted(r[0] for r in db.execute("SELECT k FROM t")) == ["a", "c", "d"]
    with pytest.raises(RuntimeError), db.transaction():  # an outer failure undoes all
        db.execute("INSERT INTO t VALUES ('e')")
        with db.transaction():
            db.execute("INSERT INTO t VALUES ('f')")
        raise RuntimeError("refused")
    assert sorted(r[0] for r in db.execute("SELECT k FROM t")) == ["a", "c", "d"]
    db.close()


async def test_a_burst_is_stored_whole_but_for_the_refused_message(mosquitto, tmp_path) -> None:
    tag = uuid.uuid4().hex[:6]
    good, bad = f"dev-good-{tag}", f"dev-bad-{tag}"
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        async with MqttLink(client_id=tag, host=mosquitto.host, port=mosquitto.port) as link:
            await link.wait_connected(10)

            def send(device: str, kind: str, payload: bytes) -> asyncio.Task[None]:
                return asyncio.create_task(link.publish(topics.device_topic(device, kind), payload))

            implausible = {"router": {"requests": 10**12, "escalated": {}}}
            plausible = {"router": {"requests": 7, "escalated": {}}}
            sent = [
                send(good, "status", messages.status(good, online=True)),
                send(bad, "status", messages.status(bad, online=True)),
                send(bad, "telemetry", json.dumps(implausible).encode()),
                *(send(good, "events", messages.event(good, None, f"s{i}")) for i in range(40)),
                send(good, "telemetry", json.dumps(plausible).encode()),
            ]
            await asyncio.gather(*sent)
            async with asyncio.timeout(20):
                while len(cp.registry.events(good, 100)) < 40 or not _telemetry(cp, good):
                    await asyncio.sleep(0.05)
        stages = [e["stage"] for e in reversed(cp.registry.events(good, 100))]
        assert stages == [f"s{i}" for i in range(40)]  # every one, in order
        assert _telemetry(cp, good)["totals"] == {"requests": 7}
        assert _telemetry(cp, bad) is None  # refused, and nothing else of its batch undone
        states = {d["device_id"]: d["state"] for d in cp.registry.devices()}
        assert states[good] == states[bad] == "online"


def _telemetry(cp: ControlPlane, device: str) -> dict | None:
    found = [d["telemetry"] for d in cp.registry.devices() if d["device_id"] == device]
    return found[0] if found else None
