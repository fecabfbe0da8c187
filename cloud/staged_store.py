"""Registry tables of staged rollouts, per-version telemetry, resends and handled events.

Kept apart from ``cloud.registry`` (one schema block, its own module): everything a
control plane needs to resume a staged rollout after a restart, and to share the work
with a replica on the same PostgreSQL, lives in these rows, never only in memory.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from cloud import audit_log
from cloud.database import Database
from common.errors import ConflictError, NotFoundError
from common.names import check_name

SCHEMA = """
CREATE TABLE IF NOT EXISTS staged_rollouts (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, spec TEXT NOT NULL,
    state TEXT NOT NULL, phase TEXT NOT NULL, stage INTEGER NOT NULL, child_id TEXT,
    soak_until DOUBLE PRECISION, paused_at DOUBLE PRECISION, halt_reason TEXT,
    reports TEXT NOT NULL, created_by TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION, owner TEXT, lease_until DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS staged_devices (
    rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, stage INTEGER NOT NULL,
    previous_version TEXT, child_id TEXT, rollback_id TEXT, rolled_back TEXT,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE TABLE IF NOT EXISTS version_telemetry (
    device_id TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    reports INTEGER NOT NULL, requests DOUBLE PRECISION NOT NULL,
    escalated DOUBLE PRECISION NOT NULL, errors DOUBLE PRECISION NOT NULL,
    local_count DOUBLE PRECISION NOT NULL, p95_sum DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device_id, model, version)
);
CREATE TABLE IF NOT EXISTS handled_events (
    device_id TEXT NOT NULL, event_key TEXT NOT NULL, handled_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device_id, event_key)
);
CREATE TABLE IF NOT EXISTS pending_commands (
    command_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, rollout_id TEXT NOT NULL,
    payload TEXT NOT NULL, attempts INTEGER NOT NULL, next_at DOUBLE PRECISION NOT NULL
);
"""

# Live states; the rest are final once the phase is "done".
RUNNING, PAUSED = "running", "paused"
SUCCEEDED, HALTED, ABORTED, ROLLED_BACK = "succeeded", "halted", "aborted", "rolled_back"
DEPLOYING, SOAKING, ROLLING_BACK, DONE = "deploying", "soaking", "rolling_back", "done"
HANDLED_EVENTS_KEEP_S = 7 * 86400.0  # redeliveries come within minutes; a week is ample


class StagedStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        db.schema(SCHEMA)

    # -- staged rollouts ----------------------------------------------------------

    def create(
        self,
        rollout_id: str,
        model: str,
        version: str,
        spec: dict[str, Any],
        devices: list[tuple[str, int, str | None]],
        actor: str,
        reason: str | None,
    ) -> None:
        """The rollout, its devices (id, stage, previous version) and its audit row, at once."""
        now = time.time()
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO staged_rollouts (id, model, version, spec, state, phase, stage,"
                " reports, created_by, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    rollout_id,
                    model,
                    version,
                    json.dumps(spec),
                    RUNNING,
                    DEPLOYING,
                    0,
                    "[]",
                    actor,
                    now,
                ),
            )
            db.executemany(
                "INSERT INTO staged_devices (rollout_id, device_id, stage, previous_version)"
                " VALUES (?,?,?,?)",
                [(rollout_id, d, s, p) for d, s, p in devices],
            )
            audit_log.append(
                db,
                actor,
                "create",
                rollout_id,
                reason,
                {"model": model, "version": version, **spec},
            )

    def get(self, rollout_id: str) -> dict[str, Any]:
        check_name(rollout_id, "rollout id")
        rows = self._db.execute(
            "SELECT id, model, version, spec, state, phase, stage, child_id, soak_until,"
            " paused_at, halt_reason, reports, created_by, created_at, finished_at"
            " FROM staged_rollouts WHERE id=?",
            (rollout_id,),
        )
        if not rows:
            raise NotFoundError(f"unknown rollout {rollout_id!r}")
        return _rollout_row(rows[0])

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT id, model, version, spec, state, phase, stage, child_id, soak_until,"
            " paused_at, halt_reason, reports, created_by, created_at, finished_at"
            " FROM staged_rollouts ORDER BY created_at DESC LIMIT ?",
            (limit,),
        )
        return [_rollout_row(r) for r in rows]

    def devices(self, rollout_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT s.device_id, s.stage, s.previous_version, s.child_id, s.rollback_id,"
            " s.rolled_back, r.stage, r.error, b.stage, b.error, r.command_id, r.package"
            " FROM staged_devices s"
            " LEFT JOIN rollout_devices r ON r.rollout_id = s.child_id"
            " AND r.device_id = s.device_id"
            " LEFT JOIN rollout_devices b ON b.rollout_id = s.rollback_id"
            " AND b.device_id = s.device_id"
            " WHERE s.rollout_id=? ORDER BY s.stage, s.device_id",
            (rollout_id,),
        )
        keys = (
            "device_id",
            "stage",
            "previous_version",
            "child_id",
            "rollback_id",
            "rolled_back",
            "step",
            "error",
            "rollback_step",
            "rollback_error",
            "command_id",
            "package",  # what the device was sent: "onnx" or an engine id (common.hardware)
        )
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def download_progress(self, device_id: str, command_id: str) -> int | None:
        """The percent of the artifact the device last said it had (None: not said)."""
        rows = self._db.execute(
            "SELECT payload FROM events WHERE device_id=? AND command_id=?"
            " AND stage='downloading' ORDER BY id DESC LIMIT 1",
            (device_id, command_id),
        )
        value = json.loads(rows[0][0]).get("progress") if rows else None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100:
            return value
        return None  # a device's word: only a plain percentage is shown

    def unfinished(self) -> list[str]:
        rows = self._db.execute("SELECT id FROM staged_rollouts WHERE phase <> ?", (DONE,))
        return [r[0] for r in rows]

    def claim(self, rollout_id: str, owner: str, lease_s: float) -> bool:
        """Take or renew the lease on a rollout: one replica drives each one at a time."""
        now = time.time()
        rows = self._db.execute(
            "UPDATE staged_rollouts SET owner=?, lease_until=? WHERE id=? AND phase <> ?"
            " AND (owner=? OR owner IS NULL OR lease_until < ?) RETURNING id",
            (owner, now + lease_s, rollout_id, DONE, owner, now),
        )
        return bool(rows)

    def release(self, owner: str) -> None:
        self._db.execute(
            "UPDATE staged_rollouts SET owner=NULL, lease_until=0 WHERE owner=?", (owner,)
        )

    def update(self, rollout_id: str, expect: dict[str, Any], **values: Any) -> bool:
        """Set ``values`` if the row still has ``expect`` (a compare-and-set); False if not."""
        for key in (*values, *expect):
            if key not in _COLUMNS:
                raise ValueError(f"unknown column {key}")
        sets = ", ".join(f"{k}=?" for k in values)
        where = "".join(f" AND {k}=?" for k in expect)
        args = [_encode(v) for v in values.values()] + list(expect.values())
        rows = self._db.execute(
            f"UPDATE staged_rollouts SET {sets} WHERE id=?{where} RETURNING id",
            (*args[: len(values)], rollout_id, *args[len(values) :]),
        )
        return bool(rows)

    def set_devices(self, rollout_id: str, devices: list[str], **values: Any) -> None:
        for key in values:
            if key not in ("child_id", "rollback_id", "rolled_back"):
                raise ValueError(f"unknown column {key}")
        sets = ", ".join(f"{k}=?" for k in values)
        self._db.executemany(
            f"UPDATE staged_devices SET {sets} WHERE rollout_id=? AND device_id=?",
            [(*values.values(), rollout_id, d) for d in devices],
        )

    def operator_action(
        self,
        rollout_id: str,
        action: str,
        actor: str,
        reason: str | None,
        allowed_from: tuple[str, ...],
        **values: Any,
    ) -> dict[str, Any]:
        """An operator's pause/resume/abort/rollback: a compare-and-set plus its audit row.

        ConflictError when the rollout is in a state the action does not apply to.
        """
        current = self.get(rollout_id)
        if current["state"] not in allowed_from or (
            current["phase"] == DONE and action != "rollback"
        ):
            raise ConflictError(
                f"cannot {action} rollout {rollout_id}: it is {current['state']}"
                + (" (finished)" if current["phase"] == DONE else "")
            )
        with self._db.transaction() as db:
            sets = ", ".join(f"{k}=?" for k in values)
            rows = db.execute(
                f"UPDATE staged_rollouts SET {sets} WHERE id=? AND state=? AND phase=?"
                " RETURNING id",
                (
                    *[_encode(v) for v in values.values()],
                    rollout_id,
                    current["state"],
                    current["phase"],
                ),
            )
            if not rows:
                raise ConflictError(f"rollout {rollout_id} changed meanwhile; try again")
            audit_log.append(db, actor, action, rollout_id, reason, None)
        return current

    # -- per-version telemetry ---------------------------------------------------------

    def add_version_telemetry(
        self, device_id: str, model: str, version: str, f: dict[str, float]
    ) -> None:
        """Add one report's figures to the device's totals for ``model`` ``version``."""
        self._db.execute(
            "INSERT INTO version_telemetry VALUES (?,?,?,1,?,?,?,?,?)"
            " ON CONFLICT(device_id, model, version) DO UPDATE SET"
            " reports=version_telemetry.reports+1,"
            " requests=version_telemetry.requests+excluded.requests,"
            " escalated=version_telemetry.escalated+excluded.escalated,"
            " errors=version_telemetry.errors+excluded.errors,"
            " local_count=version_telemetry.local_count+excluded.local_count,"
            " p95_sum=version_telemetry.p95_sum+excluded.p95_sum",
            (
                device_id,
                model,
                version,
                f["requests"],
                f["escalated"],
                f["errors"],
                f["local_count"],
                f["p95_sum"],
            ),
        )

    def version_figures(self, model: str, version: str, devices: list[str]) -> dict[str, float]:
        """The totals of ``devices`` on ``model`` ``version`` (zeros where none reported)."""
        out = dict.fromkeys(
            ("reports", "requests", "escalated", "errors", "local_count", "p95_sum"), 0.0
        )
        if not devices:
            return out
        marks = ",".join("?" * len(devices))
        rows = self._db.execute(
            "SELECT SUM(reports), SUM(requests), SUM(escalated), SUM(errors), SUM(local_count),"
            " SUM(p95_sum) FROM version_telemetry WHERE model=? AND version=?"
            f" AND device_id IN ({marks})",
            (model, version, *devices),
        )
        for key, value in zip(out, rows[0], strict=True):
            out[key] = float(value or 0.0)
        return out

    def device_models(self, device_id: str) -> list[dict[str, Any]]:
        """The models a device's own status lists (empty if it never reported one)."""
        rows = self._db.execute("SELECT status FROM devices WHERE device_id=?", (device_id,))
        models = json.loads(rows[0][0]).get("models") if rows else None
        return [m for m in models or [] if isinstance(m, dict)]

    # -- resends of unacknowledged commands ------------------------------------------------

    def remember_commands(
        self, rollout_id: str, commands: dict[str, tuple[str, bytes]], first_s: float
    ) -> None:
        """device -> (command id, signed payload): resent until the device answers."""
        at = time.time() + first_s
        self._db.executemany(
            "INSERT INTO pending_commands VALUES (?,?,?,?,0,?)",
            [(cid, d, rollout_id, p.decode(), at) for d, (cid, p) in commands.items()],
        )

    def due_commands(self) -> list[tuple[str, str, str, int, float]]:
        """(command id, device, payload, attempts, next_at) of commands still unanswered.

        Forgets, first, those answered (any event moved the step off ``sent``) or whose
        rollout ended.
        """
        self._db.execute(
            "DELETE FROM pending_commands WHERE command_id IN (SELECT p.command_id FROM"
            " pending_commands p JOIN rollout_devices r ON r.command_id = p.command_id"
            " JOIN rollouts o ON o.id = r.rollout_id WHERE r.stage <> 'sent'"
            " OR o.state <> 'running')"
        )
        rows = self._db.execute(
            "SELECT command_id, device_id, payload, attempts, next_at FROM pending_commands"
            " WHERE next_at <= ?",
            (time.time(),),
        )
        return [(r[0], r[1], r[2], int(r[3]), float(r[4])) for r in rows]

    def claim_resend(self, command_id: str, next_at: float, new_next_at: float) -> bool:
        """Compare-and-set on ``next_at``: of two replicas, one resends."""
        rows = self._db.execute(
            "UPDATE pending_commands SET attempts=attempts+1, next_at=?"
            " WHERE command_id=? AND next_at=? RETURNING command_id",
            (new_next_at, command_id, next_at),
        )
        return bool(rows)

    def forget_handled_events(self, older_than_s: float = HANDLED_EVENTS_KEEP_S) -> None:
        self._db.execute(
            "DELETE FROM handled_events WHERE handled_at < ?", (time.time() - older_than_s,)
        )


_COLUMNS = (
    "state",
    "phase",
    "stage",
    "child_id",
    "soak_until",
    "paused_at",
    "halt_reason",
    "reports",
    "finished_at",
)


def _encode(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def _rollout_row(r: tuple) -> dict[str, Any]:
    soak_until = r[8]
    return {
        "id": r[0],
        "model": r[1],
        "version": r[2],
        "spec": json.loads(r[3]),
        "state": r[4],
        "phase": r[5],
        "stage": r[6],
        "child_id": r[7],
        "soak_until": soak_until if soak_until is None or math.isfinite(soak_until) else None,
        "paused_at": r[9],
        "halt_reason": json.loads(r[10]) if r[10] else None,
        "reports": json.loads(r[11]),
        "created_by": r[12],
        "created_at": r[13],
        "finished_at": r[14],
    }
