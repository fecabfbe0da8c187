"""Schema migrations and version lineage in the registry, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from cloud.database import Database
from cloud.migrations import BASE_SCHEMA, MIGRATIONS, Migration, migrate
from cloud.registry import Registry
from common.errors import ConflictError, InvalidInputError, StoreError
from common.lineage import Lineage
from common.manifest import Manifest, SignedManifest
from tests.model_fixtures import make_package


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "control.sqlite")
    return request.getfixturevalue("postgres_url")


def _versions(db: Database) -> list[tuple]:
    return db.execute("SELECT version, description FROM schema_version ORDER BY version")


def test_migrations_apply_in_order_once(database) -> None:
    db = Database(database)
    try:
        assert migrate(db) == [m.number for m in MIGRATIONS] == [1, 2, 3, 4, 5]
        assert migrate(db) == []  # opening again applies nothing
        assert [v for v, _ in _versions(db)] == [1, 2, 3, 4, 5]
        assert "lineage" in _versions(db)[1][1]
    finally:
        db.close()


def test_a_device_event_finds_its_rollout_row_by_index(database) -> None:
    """Every event a device sends updates its rollout row by command id: a scan of all
    rollout rows ever written, per event, before migration 5."""
    db = Database(database)
    try:
        migrate(db)
        if db.dialect == "sqlite":
            plan = " ".join(
                str(row[-1])
                for row in db.execute(
                    "EXPLAIN QUERY PLAN UPDATE rollout_devices SET stage='x'"
                    " WHERE device_id='d' AND command_id='c'"
                )
            )
            assert "USING INDEX rollout_devices_by_command" in plan, plan
        else:
            db.execute("SET enable_seqscan = off")  # a tiny table: make the planner show it
            plan = " ".join(
                str(row[0])
                for row in db.execute(
                    "EXPLAIN UPDATE rollout_devices SET stage='x'"
                    " WHERE device_id='d' AND command_id='c'"
                )
            )
            assert "rollout_devices_by_command" in plan, plan
    finally:
        db.close()


def test_a_failing_migration_leaves_nothing_behind(database) -> None:
    def broken(db: Database) -> None:
        db.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("disk on fire")

    db = Database(database)
    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            migrate(db, (*MIGRATIONS, Migration(6, "broken", broken)))
        assert [v for v, _ in _versions(db)] == [1, 2, 3, 4, 5]
        db.execute("CREATE TABLE half_done (x INTEGER)")  # it was rolled back
    finally:
        db.close()


def test_a_database_newer_than_the_code_is_refused(database, tmp_path) -> None:
    db = Database(database)
    migrate(db)
    db.execute("INSERT INTO schema_version VALUES (?,?,?)", (99, "from the future", time.time()))
    db.close()
    with pytest.raises(StoreError, match="version 99, newer"):
        Registry(database, tmp_path / "store")


def _old_publish(db: Database, signed: SignedManifest) -> None:
    """What the registry before migrations wrote: its schema, its positional insert."""
    m = signed.manifest
    db.execute(
        "INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?)",
        (m.name, m.variant, m.version, m.release, json.dumps(signed.to_dict()), "0" * 64, 1,
         m.parent, time.time()),
    )  # fmt: skip


def test_a_registry_made_by_the_old_schema_upgrades_in_place(database, tmp_path) -> None:
    pkg = make_package(tmp_path / "old", name="toy", version="2", release=2)
    old = replace(pkg.manifest, parent="1", evaluation={"accuracy": 0.9})
    db = Database(database)
    db.schema(BASE_SCHEMA)  # exactly what Registry.__init__ ran before migrations
    _old_publish(db, SignedManifest.sign(old, pkg.signer))
    db.close()

    registry = Registry(database, tmp_path / "store")
    try:
        (record,) = registry.versions("toy")
        assert record.summary()["lineage"] == {"parent": "toy:1", "method": None, "params": {}}
        metrics = record.summary()["metrics"]
        assert metrics["quality_metric"] == "accuracy" and metrics["quality"] == 0.9
        assert metrics["size_bytes"] == pkg.manifest.file("model").size
        # and the upgraded registry takes new versions with lineage
        new = make_package(tmp_path / "new", name="toy", version="3", release=3)
        manifest = replace(new.manifest, lineage=Lineage("int8-static-qdq", "toy:2"))
        registry.publish(new.directory, manifest, new.signer)
        assert registry.lineage("toy", "3")["nodes"][-1]["parents"] == ["toy:2"]
    finally:
        registry.close()


def _publish(registry: Registry, tmp_path, version: str, lineage: Lineage | None, **kw):
    pkg = make_package(
        tmp_path / f"p-{kw.get('name', 'toy')}-{version}-{kw.get('variant', 'edge')}",
        version=version,
        release=int(version),
        **{"seed": int(version), **kw},
    )
    manifest: Manifest = replace(pkg.manifest, lineage=lineage)
    return registry.publish(pkg.directory, manifest, pkg.signer)


def test_lineage_is_recorded_checked_and_walked(database, tmp_path) -> None:
    registry = Registry(database, tmp_path / "store")
    try:
        root = _publish(registry, tmp_path, "1", Lineage("train"))
        sha = root.manifest.file("model").sha256
        params = {"amount": 0.3, "kind": "structured"}
        _publish(registry, tmp_path, "2", Lineage("prune-structured-30%", "toy:1", params, sha))
        _publish(registry, tmp_path, "3", Lineage("int8-static-qdq", "toy:2"))
        (v2,) = registry.model_versions("toy", "2")
        assert v2.summary()["lineage"] == {
            "parent": "toy:1",
            "method": "prune-structured-30%",
            "params": params,
        }
        view = registry.lineage("toy", "2")
        assert [n["ref"] for n in view["nodes"]] == ["toy:1", "toy:2", "toy:3"]
        assert view["focus"] == ["toy:2"]

        # a parent that was never published
        with pytest.raises(InvalidInputError, match="not in the registry"):
            _publish(registry, tmp_path, "4", Lineage("distill", "toy:9"))
        # a cycle: toy:1's cloud variant may not derive from its own descendant
        with pytest.raises(ConflictError, match="cycle"):
            _publish(registry, tmp_path, "1", Lineage("train", "toy:3"), variant="cloud")
        with pytest.raises(ConflictError, match="cycle"):
            _publish(registry, tmp_path, "2", Lineage("train", "toy:2"), variant="cloud")
        # a parent of another model: claims other:1, but was made from toy:1's file
        _publish(registry, tmp_path, "1", Lineage("train"), name="other", seed=7)
        with pytest.raises(InvalidInputError, match="made from another model"):
            _publish(registry, tmp_path, "5", Lineage("distill", "other:1", {}, sha))
        # a real cross-model parent (a distilled student's teacher) is fine
        _publish(registry, tmp_path, "6", Lineage("distill", "other:1", {"temperature": 4}))
        assert [n["ref"] for n in registry.lineage("other")["nodes"]] == ["other:1", "toy:6"]
        # nothing refused left a row or a package behind
        assert sorted(r.manifest.version for r in registry.versions("toy")) == ["1", "2", "3", "6"]
        assert not (tmp_path / "store" / "packages" / "toy" / "cloud").exists() or not any(
            (tmp_path / "store" / "packages" / "toy" / "cloud").iterdir()
        )
    finally:
        registry.close()


@pytest.mark.parametrize(
    "lineage",
    [
        {"method": "train", "parent": "../x"},
        {"method": "train", "parent": "toy"},
        {"method": "train", "parent": "a:b:c"},
        {"method": "../../etc", "parent": None},
        {"method": "train", "params": {"x": float("nan")}},
        {"method": "train", "params": {"x": "y" * 10_000}},
        {"method": "train", "params": {"../k": 1}},
        {"method": "train", "params": {"x": {"nested": 1}}},
        {"method": "train", "parent_sha256": "not-hex"},
        {"method": "train", "extra": 1},
        {"parent": "toy:1"},
        "train",
    ],
)
def test_malformed_lineage_is_refused_by_the_manifest(tmp_path, lineage) -> None:
    doc = make_package(tmp_path / "p").manifest.to_dict()
    with pytest.raises(InvalidInputError):
        Manifest.from_dict({**doc, "lineage": lineage})


def test_nan_or_oversized_evaluation_is_refused(tmp_path) -> None:
    doc = make_package(tmp_path / "p").manifest.to_dict()
    for evaluation in (
        {"accuracy": float("nan")},
        {"latency_p50_ms_b1": float("inf")},
        {"../x": 1.0},
        {f"m{i}": 1.0 for i in range(100)},
    ):
        with pytest.raises(InvalidInputError):
            Manifest.from_dict({**doc, "evaluation": evaluation})


def test_a_manifest_without_lineage_stays_valid_and_keeps_its_signature(tmp_path) -> None:
    pkg = make_package(tmp_path / "p")
    doc = pkg.signed.to_dict()
    assert "lineage" not in doc["manifest"]
    again = SignedManifest.from_dict(json.loads(json.dumps(doc)))
    assert again.manifest.lineage is None
    assert again.signature == pkg.signed.signature
