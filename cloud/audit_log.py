"""The audit log: who (a token's name) created, paused, resumed, aborted or rolled back
what, and why. Append-only: rows are inserted, never updated or deleted by any route."""

from __future__ import annotations

import json
import time
from typing import Any

from cloud.database import Database
from common.errors import InvalidInputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    id {autoid}, ts DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, reason TEXT, detail TEXT
);
"""
ACTIONS = ("create", "pause", "resume", "abort", "rollback")
MAX_REASON = 500


def check_reason(reason: object) -> str | None:
    """An operator's free-text reason: optional, printable, bounded."""
    if reason is None:
        return None
    if not isinstance(reason, str) or len(reason) > MAX_REASON or not reason.isprintable():
        raise InvalidInputError(f"'reason' must be printable text of at most {MAX_REASON} chars")
    return reason


def append(
    db: Database, actor: str, action: str, target: str, reason: str | None, detail: Any = None
) -> None:
    """One row; inside the caller's transaction when it has one (the change and its record
    commit together)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    db.execute(
        "INSERT INTO audit_log (ts, actor, action, target, reason, detail) VALUES (?,?,?,?,?,?)",
        (time.time(), actor, action, target, reason, json.dumps(detail) if detail else None),
    )


class AuditLog:
    def __init__(self, db: Database) -> None:
        self._db = db
        db.schema(SCHEMA)

    def append(
        self, actor: str, action: str, target: str, reason: str | None, detail: Any = None
    ) -> None:
        append(self._db, actor, action, target, reason, detail)

    def entries(self, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        rows = self._db.execute(
            "SELECT id, ts, actor, action, target, reason, detail FROM audit_log"
            " ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        keys = ("id", "ts", "actor", "action", "target", "reason", "detail")
        return [
            {**dict(zip(keys, r, strict=True)), "detail": json.loads(r[6]) if r[6] else None}
            for r in rows
        ]
