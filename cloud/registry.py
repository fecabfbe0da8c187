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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cloud.audit_log import AuditLog
from cloud.database import Database
from cloud.engine_records import (
    check_beside_onnx,
    check_engine,
    engine_path,
    engine_rows,
    insert_engine,
    is_engine,
)
from cloud.fleet_records import DEVICE_STATES, MAX_EVENTS_PER_DEVICE, FleetRecords
from cloud.lineage_graph import check_parent, lineage_view
from cloud.migrations import migrate
from cloud.operator_tokens import OperatorTokens
from cloud.staged_store import StagedStore
from cloud.version_metrics import lineage_columns, lineage_doc
from common import chunking
from common.errors import (
    AlreadyExistsError,
    ModelNotFoundError,
    NotFoundError,
    VerificationError,
)
from common.fsutil import atomic_write
from common.hardware import ONNX_PACKAGE
from common.manifest import (
    Manifest,
    SignedManifest,
    artifact_bytes,
    artifact_digest,
    sha256_file,
    write_package,
)
from common.names import check_digest, check_name, safe_join
from common.signing import Signer

__all__ = ["DEVICE_STATES", "MAX_EVENTS_PER_DEVICE", "Registry", "VersionRecord"]

_PUBLISH_LOCK = 0x4C696E65  # "Line": publishes check lineage and insert one at a time
_LINEAGE_SELECT = (
    "lineage_parent, method, params, quality_metric, quality, latency_p50_ms_b1,"
    " throughput_b32, size_bytes"
)


def _package_path(store_dir: Path, name: str, variant: str, version: str) -> Path:
    """Where the artifact store keeps a signed package (read-only for the fallback)."""
    return safe_join(store_dir / "packages", name, variant, version)


@dataclass(frozen=True)
class VersionRecord:
    signed: SignedManifest
    artifact_digest: str
    artifact_size: int
    package_dir: Path
    lineage: dict[str, Any] | None = None  # {"lineage": ..., "metrics": ...} as stored

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
            "files": [{"name": f.name, "size": f.size, "role": f.role} for f in m.files],
            **(self.lineage or {}),
            **({"target": asdict(m.target)} if is_engine(m) else {}),  # the GPU it is for
        }


class Registry(FleetRecords):
    """SQLite- or PostgreSQL-backed registry. Thread-safe: calls are serialised by a lock."""

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
        migrate(self._db)
        self.operators = OperatorTokens(self._db)
        self.audit = AuditLog(self._db)  # append-only: who did what to which rollout, why
        self.staged = StagedStore(self._db)  # staged rollouts, resends, audit: own schema

    def close(self) -> None:
        self._db.close()

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
        if is_engine(m):
            return self._store_engine(source_dir, signed)
        if self._q(
            "SELECT 1 FROM versions WHERE name=? AND variant=? AND version=?",
            (m.name, m.variant, m.version),
        ):
            raise AlreadyExistsError(f"{m.name} {m.variant} version {m.version} already exists")
        check_parent(self._db, m)  # before a byte is written to the store
        dest = _package_path(self.store_dir, m.name, m.variant, m.version)
        _place_package(source_dir, dest, signed)
        columns = lineage_columns(m)
        try:
            data = artifact_bytes(dest, m)
            digest = artifact_digest(data)
            atomic_write(self.store_dir / "artifacts" / digest, data)
            with self._db.transaction(exclusive_key=_PUBLISH_LOCK) as db:
                check_parent(db, m)  # again, with concurrent publishes held off
                db.execute(
                    "INSERT INTO versions (name, variant, version, release, signed_manifest,"
                    f" artifact_digest, artifact_size, parent, created_at, {_LINEAGE_SELECT})"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                        *columns,
                    ),
                )
        except BaseException:
            # NOTE: no row, no directory: a package left without a row would block its
            # version for good ("exists in the store already").
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return VersionRecord(signed, digest, len(data), dest, lineage_doc(columns))

    def _store_engine(self, source_dir: Path, signed: SignedManifest) -> VersionRecord:
        """A TensorRT engine package beside its version's ONNX package (cloud.engine_records)."""
        m = signed.manifest
        package = check_engine(m)
        check_beside_onnx(self._db, m, package)  # before a byte is written to the store
        dest = engine_path(self.store_dir, m.name, m.version, package)
        _place_package(source_dir, dest, signed)
        try:
            data = artifact_bytes(dest, m)
            digest = artifact_digest(data)
            atomic_write(self.store_dir / "artifacts" / digest, data)
            with self._db.transaction(exclusive_key=_PUBLISH_LOCK) as db:
                check_beside_onnx(db, m, package)  # again, with concurrent publishes held off
                insert_engine(db, m, package, json.dumps(signed.to_dict()), digest, len(data))
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)  # as ``_store``: no row, no directory
            raise
        return VersionRecord(signed, digest, len(data), dest)

    def _engine_records(self, where: str, args: tuple) -> dict[str, VersionRecord]:
        out = {}
        for package, doc, digest, size in engine_rows(self._db, where, args):
            signed = SignedManifest.from_dict(json.loads(doc))
            m = signed.manifest
            path = engine_path(self.store_dir, m.name, m.version, package)
            out[package] = VersionRecord(signed, digest, size, path)
        return out

    def packages(self, name: str, version: str) -> dict[str, VersionRecord]:
        """Every edge package of a version: ``onnx``, and each engine by its package id
        (``common.hardware.engine_package_id``). ModelNotFoundError without the ONNX one."""
        onnx = self.version(name, version, "edge")
        return {ONNX_PACKAGE: onnx, **self._engine_records("name=? AND version=?", (name, version))}

    def engines(self, name: str, version: str | None = None) -> list[dict[str, Any]]:
        """Summaries of a model's engine packages (of one version), each with its ``package``."""
        check_name(name, "model name")
        if version is None:
            found = self._engine_records("name=?", (name,))
        else:
            found = self._engine_records(
                "name=? AND version=?", (name, check_name(version, "version"))
            )
        return [{**r.summary(), "package": p} for p, r in sorted(found.items())]

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
            f"SELECT signed_manifest, artifact_digest, artifact_size, {_LINEAGE_SELECT}"
            f" FROM versions WHERE {where} ORDER BY name, release, variant",
            args,
        )
        records = []
        for doc, digest, size, *rest in rows:
            signed = SignedManifest.from_dict(json.loads(doc))
            m = signed.manifest
            path = _package_path(self.store_dir, m.name, m.variant, m.version)
            records.append(VersionRecord(signed, digest, size, path, lineage_doc(tuple(rest))))
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

    def model_versions(self, name: str, version: str | None = None) -> list[VersionRecord]:
        """Every variant of every version of ``name`` (or of one version); NotFound if none."""
        check_name(name, "model name")
        if version is None:
            found = self._records("name=?", (name,))
        else:
            found = self._records("name=? AND version=?", (name, check_name(version, "version")))
        if not found:
            raise ModelNotFoundError(name, version)
        return found

    def lineage(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The ancestry tree around ``name[:version]`` (``cloud.lineage_graph``)."""
        if version is not None:
            check_name(version, "model version")
        return lineage_view(self._db, name, version)

    def version_by_digest(self, digest: str) -> VersionRecord:
        check_digest(digest)
        found = self._records("artifact_digest=?", (digest,))
        if not found:
            found = list(self._engine_records("artifact_digest=?", (digest,)).values())
        if not found:
            raise NotFoundError(f"unknown artifact {digest[:16]}")
        return found[0]

    def artifact_path(self, digest: str) -> Path:
        path = self.store_dir / "artifacts" / check_digest(digest)
        if not path.is_file():
            raise NotFoundError(f"unknown artifact {digest[:16]}")
        return path


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
