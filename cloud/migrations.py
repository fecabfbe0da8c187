"""The registry's schema, as numbered migrations applied in order when it is opened.

``schema_version`` records which have run. Opening applies the missing ones,
each in its own transaction together with its ``schema_version`` row, so a
crash leaves either all of a migration or none of it, and opening again
applies nothing twice. Replicas starting at once on one PostgreSQL take turns
(an advisory lock). A database newer than this code is refused rather than
guessed at.

Migration 1 is the schema as it was before migrations existed, written with
``IF NOT EXISTS``: a registry created by that code upgrades in place.
A new schema change is a new entry at the end of ``MIGRATIONS``; never edit
one that has shipped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloud.database import Database
from cloud.version_metrics import lineage_columns
from common.errors import StoreError
from common.manifest import SignedManifest

logger = logging.getLogger(__name__)

_LOCK_KEY = 0x466F676C  # "Fogl": the advisory lock migrations hold on PostgreSQL

BASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, variant TEXT NOT NULL, version TEXT NOT NULL,
    release INTEGER NOT NULL, signed_manifest TEXT NOT NULL,
    artifact_digest TEXT NOT NULL, artifact_size INTEGER NOT NULL,
    parent TEXT, created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, variant, version)
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, state TEXT NOT NULL, status TEXT NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL, seq INTEGER NOT NULL DEFAULT 0, telemetry TEXT
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL,
    state TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, finished_at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, command_id TEXT NOT NULL,
    stage TEXT NOT NULL, error TEXT, updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE TABLE IF NOT EXISTS events (
    id {autoid}, device_id TEXT NOT NULL, command_id TEXT,
    stage TEXT NOT NULL, payload TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_device ON events (device_id, id);
"""

# (column, SQL type): what migration 2 adds to ``versions``, in ``lineage_columns`` order.
LINEAGE_COLUMNS = (
    ("lineage_parent", "TEXT"),  # "name:version" or NULL
    ("method", "TEXT"),
    ("params", "TEXT"),  # JSON object
    ("quality_metric", "TEXT"),  # accuracy | mean_cosine | NULL
    ("quality", "DOUBLE PRECISION"),
    ("latency_p50_ms_b1", "DOUBLE PRECISION"),
    ("throughput_b32", "DOUBLE PRECISION"),
    ("size_bytes", "BIGINT"),
)


def _base(db: Database) -> None:
    db.schema(BASE_SCHEMA)


def _lineage(db: Database) -> None:
    """Parent, method and figures as columns, filled in for versions published before."""
    for column, sql_type in LINEAGE_COLUMNS:
        db.execute(f"ALTER TABLE versions ADD COLUMN {column} {sql_type}")
    rows = db.execute("SELECT name, variant, version, signed_manifest FROM versions")
    sets = ", ".join(f"{c}=?" for c, _ in LINEAGE_COLUMNS)
    for name, variant, version, doc in rows:
        manifest = SignedManifest.from_dict(json.loads(doc)).manifest
        db.execute(
            f"UPDATE versions SET {sets} WHERE name=? AND variant=? AND version=?",
            (*lineage_columns(manifest), name, variant, version),
        )


def _parent_index(db: Database) -> None:
    db.execute("CREATE INDEX IF NOT EXISTS versions_by_parent ON versions (lineage_parent)")


ENGINE_SCHEMA = """
CREATE TABLE engine_packages (
    name TEXT NOT NULL, version TEXT NOT NULL, package TEXT NOT NULL,
    compute_capability TEXT NOT NULL, tensorrt_version TEXT NOT NULL,
    signed_manifest TEXT NOT NULL, artifact_digest TEXT NOT NULL,
    artifact_size BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, version, package)
);
CREATE INDEX engine_packages_by_digest ON engine_packages (artifact_digest);
"""


def _engine_packages(db: Database) -> None:
    """Engine packages beside each version's ONNX package (``cloud.engine_records``), and
    which package each device of a rollout was sent (NULL before: the ONNX one)."""
    for statement in ENGINE_SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("ALTER TABLE rollout_devices ADD COLUMN package TEXT")


def _command_index(db: Database) -> None:
    """Every device event finds its rollout row by ``command_id`` (``record_event``,
    and the resend loop's join): without an index each one scanned every rollout row
    ever written, which grows with fleet size times rollouts."""
    db.execute(
        "CREATE INDEX IF NOT EXISTS rollout_devices_by_command ON rollout_devices (command_id)"
    )


@dataclass(frozen=True)
class Migration:
    number: int
    description: str
    apply: Callable[[Database], None]


MIGRATIONS = (
    Migration(1, "base schema: versions, devices, rollouts, events", _base),
    Migration(2, "versions: lineage parent, method, params and metrics", _lineage),
    Migration(3, "index versions by lineage parent", _parent_index),
    Migration(
        4, "engine packages per GPU target; the package each rollout device got", _engine_packages
    ),
    Migration(5, "index rollout devices by command id", _command_index),
)


def current_version(db: Database) -> int:
    rows = db.execute("SELECT MAX(version) FROM schema_version")
    return int(rows[0][0] or 0) if rows else 0


def migrate(db: Database, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply the migrations this database lacks, in order; return the numbers applied."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
        " description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
    )
    newest = migrations[-1].number
    applied: list[int] = []
    for migration in migrations:
        with db.transaction(exclusive_key=_LOCK_KEY):
            have = current_version(db)  # read under the lock: another replica may have run it
            if have > newest:
                raise StoreError(
                    f"the database schema is version {have}, newer than this control plane "
                    f"knows ({newest}): upgrade Fogline"
                )
            if migration.number <= have:
                continue
            if migration.number != have + 1:
                raise StoreError(f"schema migration {have + 1} is missing")
            migration.apply(db)
            db.execute(
                "INSERT INTO schema_version VALUES (?,?,?)",
                (migration.number, migration.description, time.time()),
            )
        applied.append(migration.number)
        logger.info("schema migration %d applied: %s", migration.number, migration.description)
    return applied
