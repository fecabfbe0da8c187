"""The control plane's state: model versions, devices, rollouts, events (SQLite).

Packages live in the artifact store (a directory): ``packages/{name}/{variant}/{version}/``
holds the signed package and ``artifacts/{digest}`` the concatenated artifact
that is sent to devices. Every write is one transaction.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud.audit_log import AuditLog
from cloud.database import Database
from cloud.operator_tokens import OperatorTokens
from cloud.staged_store import StagedStore
from cloud.telemetry import telemetry_increments
from common import chunking
from common.errors import (
    AlreadyExistsError,
    ModelNotFoundError,
    NotFoundError,
    VerificationError,
)
from common.fsutil import atomic_write
from common.manifest import (
    Manifest,
    SignedManifest,
    artifact_bytes,
    artifact_digest,
    sha256_file,
    write_package,
)
from common.messages import CHUNK_REJECTED
from common.names import check_digest, check_name, safe_join
from common.signing import Signer

SCHEMA = """
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


DEVICE_STATES = ("online", "offline")
MAX_EVENTS_PER_DEVICE = 500  # the newest are kept; a device cannot fill the disk


def _package_path(store_dir: Path, name: str, variant: str, version: str) -> Path:
    """Where the artifact store keeps a signed package (read-only for the fallback)."""
    return safe_join(store_dir / "packages", name, variant, version)


@dataclass(frozen=True)
class VersionRecord:
    signed: SignedManifest
    artifact_digest: str
    artifact_size: int
    package_dir: Path

    @property
    def manifest(self) -> Manifest:
        return self.signed.manifest

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": m.name,
            "version": m.version,
            "variant": m.variant,
            "release": m.release,
            "precision": m.precision,
            "format": m.format,
            "parent": m.parent,
            "artifact": {"digest": self.artifact_digest, "size": self.artifact_size},
            "evaluation": m.evaluation,
        }


class Registry:
    """SQLite-backed registry. Thread-safe: calls are serialised by a lock."""

    def __init__(
        self,
        database: str | Path,
        store_dir: Path,
        *,
        chunk_size: int = chunking.DEFAULT_CHUNK_SIZE,
    ) -> None:
        """``database``: a SQLite file path, or a ``postgresql://`` URL.

        ``chunk_size``: the smallest MQTT chunk for what this registry signs
        (big artifacts get bigger chunks: ``chunking.chunk_size_for``).
        """
        self.store_dir = store_dir
        self.chunk_size = chunk_size
        (store_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        self._db = Database(database)
        self._db.schema(SCHEMA)
        self.operators = OperatorTokens(self._db)
        self.audit = AuditLog(self._db)  # append-only: who did what to which rollout, why
        self.staged = StagedStore(self._db)  # staged rollouts, resends, audit: own schema

    def close(self) -> None:
        self._db.close()

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._db.execute(sql, args)

    # -- model versions ------------------------------------------------------------

    def publish(self, source_dir: Path, manifest: Manifest, signer: Signer) -> VersionRecord:
        """Sign a package whose files are in ``source_dir`` and store it.

        The files are checked against the manifest before anything is written to the
        store, and the package directory appears by one rename, never over another.
        """
        manifest.validate()
        _check_files(source_dir, manifest)  # before a byte is read for the chunk list
        m = self.with_chunks(source_dir, manifest)
        return self._store(source_dir, SignedManifest.sign(m, signer))

    def publish_signed(self, source_dir: Path, signed: SignedManifest) -> VersionRecord:
        """Store a package signed elsewhere (offline, by a release key: the caller checked
        whose). Its signed chunk list must describe its files (VerificationError if not)."""
        signed.manifest.validate()
        _check_files(source_dir, signed.manifest)
        signed.manifest.check_chunks(artifact_bytes(source_dir, signed.manifest))
        return self._store(source_dir, signed)

    def _store(self, source_dir: Path, signed: SignedManifest) -> VersionRecord:
        m = signed.manifest
        if self._q(
            "SELECT 1 FROM versions WHERE name=? AND variant=? AND version=?",
            (m.name, m.variant, m.version),
        ):
            raise AlreadyExistsError(f"{m.name} {m.variant} version {m.version} already exists")
        dest = _package_path(self.store_dir, m.name, m.variant, m.version)
        _place_package(source_dir, dest, signed)
        try:
            data = artifact_bytes(dest, m)
            digest = artifact_digest(data)
            atomic_write(self.store_dir / "artifacts" / digest, data)
            self._q(
                "INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    m.name,
                    m.variant,
                    m.version,
                    m.release,
                    json.dumps(signed.to_dict()),
                    digest,
                    len(data),
                    m.parent,
                    time.time(),
                ),
            )
        except BaseException:
            # NOTE: no row, no directory: a package left without a row would block its
            # version for good ("exists in the store already").
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return VersionRecord(signed, digest, len(data), dest)

    def with_chunks(self, source_dir: Path, manifest: Manifest) -> Manifest:
        """``manifest`` with the chunk list of its files in ``source_dir``: call before signing.

        NOTE: recomputed even when an upload carries a list: the control plane signs it,
        so it vouches for it. An uploaded size is kept; otherwise this registry's policy
        (``chunk_size``, grown for big artifacts) picks one. Raises VerificationError
        unless the files match the manifest.
        """
        data = artifact_bytes(source_dir, manifest)
        chunks = manifest.chunks
        size = chunks.size if chunks else chunking.chunk_size_for(len(data), self.chunk_size)
        return manifest.with_chunks(data, size)

    def _records(self, where: str, args: tuple) -> list[VersionRecord]:
        rows = self._q(
            "SELECT signed_manifest, artifact_digest, artifact_size FROM versions"
            f" WHERE {where} ORDER BY name, release",
            args,
        )
        records = []
        for doc, digest, size in rows:
            signed = SignedManifest.from_dict(json.loads(doc))
            m = signed.manifest
            path = _package_path(self.store_dir, m.name, m.variant, m.version)
            records.append(VersionRecord(signed, digest, size, path))
        return records

    def resign(self, old_key_id: str, signer: Signer) -> int:
        """Re-sign every manifest ``old_key_id`` signed with ``signer`` (after a rotation,
        so versions published before it still deploy once the old key is retired).
        Manifests signed offline by release keys are left alone. Returns how many."""
        count = 0
        for record in self._records("1=1", ()):
            if record.signed.key_id != old_key_id:
                continue
            signed = SignedManifest.sign(record.manifest, signer)
            write_package(record.package_dir, signed)
            m = record.manifest
            self._q(
                "UPDATE versions SET signed_manifest=? WHERE name=? AND variant=? AND version=?",
                (json.dumps(signed.to_dict()), m.name, m.variant, m.version),
            )
            count += 1
        return count

    def version(self, name: str, version: str, variant: str = "edge") -> VersionRecord:
        check_name(name, "model name")
        check_name(version, "model version")
        check_name(variant, "variant")
        found = self._records("name=? AND variant=? AND version=?", (name, variant, version))
        if not found:
            raise ModelNotFoundError(name, f"{version} ({variant})")
        return found[0]

    def versions(self, name: str | None = None) -> list[VersionRecord]:
        if name is not None:
            check_name(name, "model name")
        return self._records("name=?", (name,)) if name else self._records("1=1", ())

    def version_by_digest(self, digest: str) -> VersionRecord:
        check_digest(digest)
        found = self._records("artifact_digest=?", (digest,))
        if not found:
            raise NotFoundError(f"unknown artifact {digest[:16]}")
        return found[0]

    def artifact_path(self, digest: str) -> Path:
        path = self.store_dir / "artifacts" / check_digest(digest)
        if not path.is_file():
            raise NotFoundError(f"unknown artifact {digest[:16]}")
        return path

    # -- devices -------------------------------------------------------------------

    def upsert_device(self, device_id: str, status: dict[str, Any]) -> None:
        """Store a device's status; ``device_id`` is who sent it (its topic), not the payload."""
        check_name(device_id, "device id")
        state = status.get("state")
        status = {**status, "device_id": device_id}
        status["state"] = state if state in DEVICE_STATES else "unknown"
        self._q(
            "INSERT INTO devices (device_id, state, status, last_seen) VALUES (?,?,?,?)"
            " ON CONFLICT(device_id) DO UPDATE SET state=excluded.state,"
            " status=excluded.status, last_seen=excluded.last_seen",
            (device_id, status["state"], json.dumps(status), time.time()),
        )

    def record_telemetry(self, device_id: str, doc: dict[str, Any]) -> None:
        """Keep each device's latest report, plus running totals of its router counters.

        Reports count "since the last report"; the totals are what a fleet view
        shows. (History belongs in a time-series database.) A report with an
        implausible figure raises InvalidInputError and changes nothing.
        """
        check_name(device_id, "device id")
        increments = telemetry_increments(doc)
        with self._db.transaction() as db:
            rows = db.execute("SELECT telemetry FROM devices WHERE device_id=?", (device_id,))
            previous = json.loads(rows[0][0]) if rows and rows[0][0] else {}
            totals = dict(previous.get("totals") or {})
            for key, value in increments.items():
                totals[key] = totals.get(key, 0) + value
            report = {**doc, "device_id": device_id, "totals": totals}
            db.execute(
                "UPDATE devices SET telemetry=?, last_seen=? WHERE device_id=?",
                (json.dumps(report), time.time(), device_id),
            )

    def devices(self) -> list[dict[str, Any]]:
        rows = self._q("SELECT status, last_seen, telemetry FROM devices ORDER BY device_id")
        return [
            {**json.loads(s), "last_seen": seen, "telemetry": json.loads(t) if t else None}
            for s, seen, t in rows
        ]

    def seen_devices(self, device_ids: list[str]) -> set[str]:
        """Which of ``device_ids`` have reported a status of their own (online or offline).

        A row that ``next_seq`` made for a command (state ``unknown``) does not count:
        a rollout to a typo must not make the typo look like a device.
        """
        rows = self._q("SELECT device_id FROM devices WHERE state IN ('online', 'offline')")
        seen = {r[0] for r in rows}
        return {d for d in device_ids if d in seen}

    def next_seq(self, device_id: str) -> int:
        """The next command sequence number for a device (persisted before use).

        One atomic ``UPDATE ... RETURNING``: replicas sharing PostgreSQL never hand
        out the same number twice.
        """
        check_name(device_id, "device id")
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO devices (device_id, state, status, last_seen) VALUES (?,?,?,?)"
                " ON CONFLICT(device_id) DO NOTHING",
                (device_id, "unknown", json.dumps({"device_id": device_id}), time.time()),
            )
            rows = db.execute(
                "UPDATE devices SET seq = seq + 1 WHERE device_id=? RETURNING seq", (device_id,)
            )
        return int(rows[0][0])

    # -- rollouts and events ---------------------------------------------------------

    def create_rollout(
        self, rollout_id: str, name: str, version: str, targets: dict[str, str]
    ) -> None:
        check_name(rollout_id, "rollout id")
        for device_id in targets:
            check_name(device_id, "device id")
        now = time.time()
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO rollouts VALUES (?,?,?,?,?,NULL)",
                (rollout_id, name, version, "running", now),
            )
            db.executemany(
                "INSERT INTO rollout_devices VALUES (?,?,?,?,NULL,?)",
                [(rollout_id, d, c, "sent", now) for d, c in targets.items()],
            )

    def record_event(
        self, device_id: str, doc: dict[str, Any], event_key: str | None = None
    ) -> bool:
        """Store an event from ``device_id`` and advance the rollout step of its command.

        NOTE: ``device_id`` is who sent it (the topic it came on). A step advances only
        when that device was sent that command: an event on another device's topic
        that quotes a real command id changes nothing.

        ``event_key`` (the event's id) makes handling idempotent: an event seen before,
        here or by a replica on the same database, changes nothing and returns False.
        """
        check_name(device_id, "device id")
        doc = {**doc, "device_id": device_id}
        command_id = doc.get("command_id")
        command_id = command_id if isinstance(command_id, str) else None
        now = time.time()
        with self._db.transaction() as db:
            if event_key is not None and not db.execute(
                "INSERT INTO handled_events VALUES (?,?,?) ON CONFLICT DO NOTHING"
                " RETURNING device_id",
                (device_id, event_key, now),
            ):
                return False  # handled already (a redelivery, or by a replica)
            db.execute(
                "INSERT INTO events (device_id, command_id, stage, payload, ts) VALUES (?,?,?,?,?)",
                (device_id, command_id, str(doc.get("stage")), json.dumps(doc), now),
            )
            # Bounded: a device (or a stolen login) publishing in a loop keeps only its newest.
            db.execute(
                "DELETE FROM events WHERE device_id=? AND id <= (SELECT id FROM events"
                " WHERE device_id=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (device_id, device_id, MAX_EVENTS_PER_DEVICE),
            )
            if command_id is not None and doc.get("stage") != CHUNK_REJECTED:
                # CHUNK_REJECTED says nothing of the command's progress. REJECTED means
                # "refused before it started": once the device has made progress on the
                # command, a REJECTED for it is a replayed copy being refused, not news.
                stage = str(doc.get("stage"))
                db.execute(
                    "UPDATE rollout_devices SET stage=?, error=?, updated_at=?"
                    " WHERE device_id=? AND command_id=?"
                    " AND stage NOT IN ('activated', 'failed', 'rejected')"
                    " AND (? <> 'rejected' OR stage = 'sent')",
                    (stage, _text(doc.get("error")), now, device_id, command_id, stage),
                )
        return True

    def state_counts(self) -> dict[str, dict[str, int]]:
        """How many devices and rollouts are in each state (for /metrics; one query each)."""
        return {
            table: {
                str(state): int(n)
                for state, n in self._q(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")
            }
            for table in ("devices", "rollouts")  # NOTE: two constants, never input
        }

    def rollouts(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent rollouts, newest first, each with its devices' stages."""
        ids = self._q("SELECT id FROM rollouts ORDER BY created_at DESC LIMIT ?", (limit,))
        return [self.rollout(r[0]) for r in ids]

    def running_rollouts(self) -> list[tuple[str, str, str]]:
        """(id, model, version) of rollouts not finished: to resume after a restart."""
        return [
            (r[0], r[1], r[2])
            for r in self._q("SELECT id, name, version FROM rollouts WHERE state='running'")
        ]

    def finish_rollout(self, rollout_id: str, state: str) -> bool:
        """End a running rollout; False if it had ended already (NOTE: an abort wins)."""
        rows = self._q(
            "UPDATE rollouts SET state=?, finished_at=? WHERE id=? AND state='running'"
            " RETURNING id",
            (state, time.time(), rollout_id),
        )
        return bool(rows)

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        check_name(rollout_id, "rollout id")
        rows = self._q(
            "SELECT name, version, state, created_at, finished_at FROM rollouts WHERE id=?",
            (rollout_id,),
        )
        if not rows:
            raise NotFoundError(f"unknown rollout {rollout_id!r}")
        name, version, state, created, finished = rows[0]
        devices = {
            d: {"stage": s, "error": e, "command_id": c}
            for d, s, e, c in self._q(
                "SELECT device_id, stage, error, command_id FROM rollout_devices"
                " WHERE rollout_id=?",
                (rollout_id,),
            )
        }
        seconds = (finished or time.time()) - created
        return {
            "id": rollout_id,
            "model": name,
            "version": version,
            "state": state,
            "seconds": round(seconds, 3),
            "devices": devices,
        }

    def events(self, device_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if device_id is not None:
            check_name(device_id, "device id")
        rows = self._q(
            "SELECT payload FROM events"
            + (" WHERE device_id=?" if device_id else "")
            + " ORDER BY id DESC LIMIT ?",
            (device_id, limit) if device_id else (limit,),
        )
        return [json.loads(r[0]) for r in rows]


def _check_files(directory: Path, manifest: Manifest) -> None:
    """Every file of ``manifest`` is in ``directory`` with its size and SHA-256."""
    for f in manifest.files:
        path = directory / f.name
        if not path.is_file() or path.stat().st_size != f.size or sha256_file(path) != f.sha256:
            raise VerificationError(f"file {f.name!r} is missing or does not match the manifest")


def _place_package(source_dir: Path, dest: Path, signed: SignedManifest) -> None:
    """Copy the files and the signed manifest into ``dest``, which must not exist yet."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        for f in signed.manifest.files:
            shutil.copyfile(source_dir / f.name, staging / f.name)
        write_package(staging, signed)
        if dest.exists():  # left by an interrupted publish, or a concurrent one
            what = "/".join(dest.parts[-3:])  # name/variant/version: no server paths in errors
            raise AlreadyExistsError(f"{what} exists in the store already")
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _text(value: object) -> str | None:
    return None if value is None else str(value)[:1000]
