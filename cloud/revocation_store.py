"""The device revocation list, shared by every control-plane replica through the database.

``fogline device revoke`` writes ``WORKDIR/revocations.json`` on one host, but
replicas on one PostgreSQL each run on a WORKDIR of their own (the key lock is
exclusive). Each replica merges its file into one row here and serves the merge:
a device revoked on any replica is refused by all of them (within ``poll_s``),
and every replica serves the same list under the same version, never a lower
one than a fallback may already hold.
"""

from __future__ import annotations

import json

from cloud.database import Database
from common.revocations import Revocations

SCHEMA = """
CREATE TABLE IF NOT EXISTS device_revocations (
    id INTEGER PRIMARY KEY, doc TEXT NOT NULL
);
"""
_LOCK = 0x5265766B  # "Revk": one merge at a time across replicas


class SharedRevocations:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._db.schema(SCHEMA)

    def merge(self, local: Revocations) -> Revocations:
        """The union of ``local`` and the shared list (stored back if it grew)."""
        with self._db.transaction(exclusive_key=_LOCK) as db:
            rows = db.execute("SELECT doc FROM device_revocations WHERE id=1")
            shared = Revocations.from_doc(json.loads(rows[0][0])) if rows else Revocations()
            merged = shared.merged(local)
            if merged != shared:
                doc = json.dumps(merged.to_doc())
                if rows:
                    db.execute("UPDATE device_revocations SET doc=? WHERE id=1", (doc,))
                else:
                    db.execute("INSERT INTO device_revocations (id, doc) VALUES (1, ?)", (doc,))
        return merged
