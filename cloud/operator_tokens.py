"""Operator identity: bearer tokens with a role, stored hashed in the registry's database.

A token is 32 random bytes (URL-safe base64 with a ``fgo_`` prefix, so a leaked
one is recognisable in logs and scanners). Only its SHA-256 is stored: with that
much entropy a plain hash cannot be reversed, and a lookup by hash needs no
constant-time comparison because the attacker does not control the hash. The
plaintext is shown once, when the token is created on the control plane's host.

Roles are ordered: ``metrics`` scrapes ``/metrics`` only, ``viewer`` reads,
``operator`` also publishes and rolls out, ``admin`` also enrolls devices and
manages tokens and keys.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cloud.database import Database
from common.errors import AlreadyExistsError, AuthError, ForbiddenError, InvalidInputError
from common.names import check_name

METRICS_READER, VIEWER, OPERATOR, ADMIN = "metrics", "viewer", "operator", "admin"
# NOTE: ordered; a role may do what the ones before it do. ``metrics`` only scrapes
# /metrics (aggregates): the token a Prometheus server keeps in its config reads no
# device ids, events or models if it leaks.
ROLES = (METRICS_READER, VIEWER, OPERATOR, ADMIN)
TOKEN_PREFIX = "fgo_"
MAX_TOKEN_LENGTH = 256

SCHEMA = """
CREATE TABLE IF NOT EXISTS operator_tokens (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
    created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION
);
"""


@dataclass(frozen=True)
class Operator:
    """Who presented a valid token."""

    name: str
    role: str

    def require(self, role: str) -> None:
        """ForbiddenError unless this operator's role includes ``role``."""
        if ROLES.index(self.role) < ROLES.index(role):
            raise ForbiddenError(f"this needs role {role!r}; token {self.name!r} is {self.role!r}")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_role(role: object) -> str:
    if role not in ROLES:
        raise InvalidInputError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return str(role)


class OperatorTokens:
    """Create, verify, list and revoke operator tokens (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._db.schema(SCHEMA)

    def create(self, name: str, role: str) -> str:
        """A new token for ``name`` (returned once, never stored in plain)."""
        check_name(name, "token name")
        check_role(role)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._db.transaction() as db:
            rows = db.execute("SELECT revoked_at FROM operator_tokens WHERE name=?", (name,))
            if rows and rows[0][0] is None:
                raise AlreadyExistsError(f"a token named {name!r} exists; revoke it first")
            # A revoked name may be reused: its old hash goes with the old row.
            db.execute("DELETE FROM operator_tokens WHERE name=?", (name,))
            db.execute(
                "INSERT INTO operator_tokens VALUES (?,?,?,?,NULL)",
                (name, role, token_hash(token), time.time()),
            )
        return token

    def verify(self, token: str) -> Operator:
        """The operator holding ``token``; AuthError if it is unknown or revoked."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("invalid operator token")
        rows = self._db.execute(
            "SELECT name, role FROM operator_tokens WHERE token_hash=? AND revoked_at IS NULL",
            (token_hash(token),),
        )
        if not rows:
            raise AuthError("invalid or revoked operator token")
        return Operator(str(rows[0][0]), str(rows[0][1]))

    def revoke(self, name: str) -> None:
        check_name(name, "token name")
        rows = self._db.execute(
            "UPDATE operator_tokens SET revoked_at=? WHERE name=? AND revoked_at IS NULL"
            " RETURNING name",
            (time.time(), name),
        )
        if not rows:
            raise InvalidInputError(f"no active token named {name!r}")

    def list(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT name, role, created_at, revoked_at FROM operator_tokens ORDER BY name"
        )
        return [
            {"name": n, "role": r, "created_at": c, "revoked": rv is not None}
            for n, r, c, rv in rows
        ]
