"""The registry on SQLite and on a real PostgreSQL: the same behaviour on both."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from cloud.registry import MAX_EVENTS_PER_DEVICE, Registry
from common import chunking
from common.errors import AlreadyExistsError, ModelNotFoundError, StoreError
from common.manifest import ChunkList, artifact_bytes
from common.signing import Signer, TrustStore
from tests.model_fixtures import make_package


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "registry.sqlite")
    return request.getfixturevalue("postgres_url")


def test_the_device_listing_text_is_the_parsed_listing(database, tmp_path) -> None:
    """``GET /api/devices`` splices the stored JSON instead of re-encoding it: the
    same document, whatever the devices sent (odd text, keys of the registry's own)."""
    registry = Registry(database, tmp_path / "store")
    try:
        assert json.loads(registry.devices_json()) == {"devices": []}
        registry.upsert_device("a", {"state": "online", "note": 'quote " brace } \u2028 é'})
        registry.upsert_device(
            "b", {"state": "offline", "last_seen": 1e300, "telemetry": {"forged": True}}
        )
        registry.upsert_device("c", {"state": "online", "labels": {"site": "berlin"}})
        registry.record_telemetry("c", {"router": {"requests": 3, "escalated": {"load": 1}}})
        listed = json.loads(registry.devices_json())
        assert listed == {"devices": registry.devices()}
        b = listed["devices"][1]
        assert b["telemetry"] is None and b["last_seen"] < 1e12  # the registry's, not b's
        assert listed["devices"][0]["note"] == 'quote " brace } \u2028 é'
    finally:
        registry.close()


def test_the_listing_does_not_wait_for_a_batch_being_written(database, tmp_path) -> None:
    """The fleet writer holds the registry's connection for a whole batch; the device
    listing reads beside it and sees what was committed."""
    registry = Registry(database, tmp_path / "store")
    registry.upsert_device("a", {"state": "online"})
    inside, release = threading.Event(), threading.Event()

    def batch() -> None:
        with registry.batch():
            registry.upsert_device("b", {"state": "online"})
            inside.set()
            release.wait(10)

    writer = threading.Thread(target=batch)
    writer.start()
    try:
        assert inside.wait(10)
        listed: list[str] = []
        reader = threading.Thread(
            target=lambda: listed.extend(
                d["device_id"] for d in json.loads(registry.devices_json())["devices"]
            )
        )
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "the listing waited for the writer's batch"
        assert listed == ["a"]  # "b" is not committed yet
    finally:
        release.set()
        writer.join(10)
    assert [d["device_id"] for d in json.loads(registry.devices_json())["devices"]] == ["a", "b"]
    registry.close()
    with pytest.raises(StoreError, match="closed"):
        registry.devices_json()


def test_versions_devices_rollouts_and_events(database, tmp_path) -> None:
    registry = Registry(database, tmp_path / "store")
    signer = Signer.generate()
    pkg = make_package(tmp_path / "pkg")
    record = registry.publish(pkg.directory, pkg.manifest, signer)
    assert registry.version("toy", "1").artifact_digest == record.artifact_digest
    assert registry.version_by_digest(record.artifact_digest).manifest.version == "1"
    with pytest.raises(AlreadyExistsError):
        registry.publish(pkg.directory, pkg.manifest, signer)
    with pytest.raises(ModelNotFoundError):
        registry.version("toy", "9")

    registry.upsert_device("d1", {"device_id": "d1", "state": "online"})
    registry.record_telemetry("d1", {"router": {"requests": 3, "escalated": {"uncertain": 1}}})
    registry.record_telemetry("d1", {"router": {"requests": 2, "escalated": {"heavy": 2}}})
    [device] = registry.devices()
    assert device["state"] == "online" and device["telemetry"]["router"]["requests"] == 2
    assert device["telemetry"]["totals"] == {"requests": 5, "escalated": 3}

    registry.create_rollout("r1", "toy", "1", {"d1": "c1"})
    assert registry.running_rollouts() == [("r1", "toy", "1")]
    registry.record_event("d1", {"command_id": "c1", "stage": "activated"})
    registry.record_event("d1", {"command_id": "c1", "stage": "staged"})  # late
    assert registry.rollout("r1")["devices"]["d1"]["stage"] == "activated"
    registry.finish_rollout("r1", "succeeded")
    assert registry.running_rollouts() == []
    assert [e["stage"] for e in registry.events("d1")] == ["staged", "activated"]
    registry.close()


def test_sequence_numbers_are_unique_across_replicas(database, tmp_path) -> None:
    """Two registries on one database (two control-plane replicas), threads in each."""
    replicas = [Registry(database, tmp_path / "store") for _ in range(2)]
    seen: list[int] = []
    lock = threading.Lock()

    def take(registry: Registry) -> None:
        for _ in range(25):
            seq = registry.next_seq("dev")
            with lock:
                seen.append(seq)

    threads = [threading.Thread(target=take, args=(r,)) for r in replicas for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(seen) == list(range(1, 101))
    for r in replicas:
        r.close()


def test_close_waits_for_queries_in_flight_and_later_ones_fail_cleanly(database, tmp_path):
    registry = Registry(database, tmp_path / "store")
    errors: list[BaseException] = []
    started = threading.Event()

    def hammer() -> None:
        started.set()
        try:
            for i in range(100_000):
                registry.upsert_device(f"d{i % 50}", {"state": "online"})
        except StoreError:
            return  # closed under us: a clean error, not a crash
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for w in workers:
        w.start()
    started.wait()
    registry.close()
    for w in workers:
        w.join(30)
    assert not errors
    with pytest.raises(StoreError, match="closed"):
        registry.devices()


def test_an_event_advances_only_the_command_sent_to_its_device(database, tmp_path) -> None:
    """record_event matches device id AND command id: a real command id quoted on another
    device's topic changes nothing (SQLite and PostgreSQL alike)."""
    registry = Registry(database, tmp_path / "store")
    registry.create_rollout("r1", "toy", "1", {"d1": "c1", "d2": "c2"})
    registry.record_event("d2", {"command_id": "c1", "stage": "activated", "device_id": "d1"})
    registry.record_event("d2", {"command_id": ["c1"], "stage": "failed"})
    devices = registry.rollout("r1")["devices"]
    assert (devices["d1"]["stage"], devices["d2"]["stage"]) == ("sent", "sent")
    assert [e["device_id"] for e in registry.events("d2")] == ["d2", "d2"]
    assert registry.events("d1") == []
    registry.record_event("d1", {"command_id": "c1", "stage": "activated"})
    assert registry.rollout("r1")["devices"]["d1"]["stage"] == "activated"
    # A replayed copy of c2, refused by d2 after it started on the real one: not a failure.
    registry.record_event("d2", {"command_id": "c2", "stage": "received"})
    registry.record_event("d2", {"command_id": "c2", "stage": "rejected", "error": "replayed"})
    assert registry.rollout("r1")["devices"]["d2"]["stage"] == "received"
    registry.close()


@pytest.mark.parametrize("bad", ["..", "../x", "/abs", "a\x00b", "x" * 65, "tоy", ""])
def test_names_are_checked_before_the_store_or_the_database(tmp_path, bad) -> None:
    from common.errors import InvalidInputError

    registry = Registry(tmp_path / "r.sqlite", tmp_path / "store")
    calls = [
        lambda: registry.version(bad, "1"),
        lambda: registry.version("toy", bad),
        lambda: registry.version("toy", "1", bad),
        lambda: registry.versions(bad),
        lambda: registry.artifact_path(bad),
        lambda: registry.version_by_digest(bad),
        lambda: registry.upsert_device(bad, {"state": "online"}),
        lambda: registry.record_telemetry(bad, {}),
        lambda: registry.record_event(bad, {"stage": "x"}),
        lambda: registry.next_seq(bad),
        lambda: registry.create_rollout("r1", "toy", "1", {bad: "c1"}),
        lambda: registry.rollout(bad),
        lambda: registry.events(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidInputError):
            call()
    registry.close()


def test_publish_never_writes_over_a_package_directory(tmp_path) -> None:
    """A directory left in the store (an interrupted publish) is refused, not overwritten;
    files that do not match the manifest are refused before the store is touched."""
    from common.errors import VerificationError

    registry = Registry(tmp_path / "r.sqlite", tmp_path / "store")
    pkg = make_package(tmp_path / "pkg")
    (pkg.directory / "golden.npz").write_bytes(b"not the golden data")
    with pytest.raises(VerificationError):
        registry.publish(pkg.directory, pkg.manifest, Signer.generate())
    assert not (tmp_path / "store" / "packages").exists()

    pkg = make_package(tmp_path / "pkg2")
    left = tmp_path / "store" / "packages" / "toy" / "edge" / "1"
    left.mkdir(parents=True)
    (left / "model.onnx").write_bytes(b"keep me")
    with pytest.raises(AlreadyExistsError):
        registry.publish(pkg.directory, pkg.manifest, Signer.generate())
    assert (left / "model.onnx").read_bytes() == b"keep me"
    assert [p.name for p in left.parent.iterdir()] == ["1"]  # no staging dir left behind
    registry.close()


def test_publish_signs_the_chunk_list_it_computed_itself(tmp_path) -> None:
    """The control plane signs: it fills the chunk list in, and recomputes an uploaded one."""
    registry = Registry(tmp_path / "r.sqlite", tmp_path / "store", chunk_size=1024)
    signer = Signer.generate()
    trust = TrustStore([signer.public_key_hex])
    pkg = make_package(tmp_path / "pkg")
    data = artifact_bytes(pkg.directory, pkg.manifest)
    record = registry.publish(pkg.directory, pkg.manifest, signer)
    record.signed.verify(trust)
    assert record.manifest.chunks == ChunkList(1024, chunking.chunk_hashes(data, 1024))
    record.manifest.check_chunks(registry.artifact_path(record.artifact_digest).read_bytes())

    # An upload with a wrong list (right length) and its own size: size kept, list recomputed.
    lying = ChunkList(512, ["0" * 64] * chunking.chunk_count(len(data), 512))
    upload = dataclasses.replace(pkg.manifest, version="2", chunks=lying)
    record = registry.publish(pkg.directory, upload, signer)
    assert record.manifest.chunks == ChunkList(512, chunking.chunk_hashes(data, 512))
    # What was stored reads back the same, list and all.
    assert registry.version("toy", "2").signed == record.signed
    registry.close()


def test_events_are_capped_per_device(database, tmp_path) -> None:
    """Red team: a device's events were kept forever (see tests/cloud/test_fleet_bounds.py)."""
    registry = Registry(database, tmp_path / "store")
    for i in range(MAX_EVENTS_PER_DEVICE + 20):
        registry.record_event("dev-a", {"command_id": None, "stage": f"s{i}"})
    registry.record_event("dev-b", {"command_id": None, "stage": "only"})
    kept = registry.events("dev-a", limit=10 * MAX_EVENTS_PER_DEVICE)
    assert len(kept) == MAX_EVENTS_PER_DEVICE
    assert kept[0]["stage"] == f"s{MAX_EVENTS_PER_DEVICE + 19}" and kept[-1]["stage"] == "s20"
    assert [e["stage"] for e in registry.events("dev-b")] == ["only"]  # others untouched
    registry.close()
