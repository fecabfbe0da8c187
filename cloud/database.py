"""The control plane's SQL connection: SQLite (a file, the default) or PostgreSQL (a URL).

Queries are written once, with ``?`` placeholders and SQL both engines accept;
this module adapts the placeholders and the one schema difference (auto ids).
PostgreSQL is what lets several control-plane replicas share one state.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.errors import StoreError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


class Database:
    """One connection, used from worker threads one query at a time.

    NOTE: every use of the connection, ``close`` included, holds ``_lock``: a worker
    thread may still be inside a query when its asyncio caller is cancelled, and
    closing a connection in use can crash the process.
    """

    def __init__(self, target: str | Path) -> None:
        self._lock = threading.RLock()
        self._depth = 0  # nested transaction() calls; only the thread holding _lock reads it
        self.dialect = "postgresql" if is_postgres_url(target) else "sqlite"
        self._target = target
        self._conn: Any = self._connect()
        self._reader: Any = None  # a second connection for ``read``, opened on first use
        self._read_lock = threading.Lock()

    def _connect(self) -> Any:
        if self.dialect == "postgresql":
            return _connect_postgres(str(self._target))
        return _connect_sqlite(Path(self._target))

    def schema(self, ddl: str) -> None:
        """Run ``CREATE TABLE IF NOT EXISTS`` statements; ``{autoid}`` is an auto id column."""
        autoid = (
            "BIGSERIAL PRIMARY KEY"
            if self.dialect == "postgresql"
            else "INTEGER PRIMARY KEY AUTOINCREMENT"
        )
        for statement in ddl.format(autoid=autoid).split(";"):
            if statement.strip():
                self.execute(statement)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            conn = self._open()
            if self.dialect == "sqlite":
                return conn.execute(sql, args).fetchall()
            with conn.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), args)
                return cur.fetchall() if cur.description is not None else []

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """A query on a connection of its own, for listings that need no transaction:
        it sees what is committed and does not wait for this process's writer, which
        holds ``execute``'s one connection for a whole batch of fleet messages (SQLite
        in WAL mode and PostgreSQL both let a reader run beside a writer)."""
        with self._read_lock:
            self._open()  # closed: the same error as ``execute``
            if self._reader is None:
                self._reader = self._connect()
            if self.dialect == "sqlite":
                return self._reader.execute(sql, args).fetchall()
            with self._reader.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), args)
                return cur.fetchall()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._lock:
            conn = self._open()
            if self.dialect == "sqlite":
                conn.executemany(sql, rows)
                return
            with conn.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)

    @contextmanager
    def transaction(self, *, exclusive_key: int | None = None) -> Iterator[Database]:
        """Statements inside run as one transaction (and no other thread interleaves).

        Nested in another transaction (a batch of fleet messages), it is a savepoint:
        an error undoes what it did and leaves the outer transaction usable.

        ``exclusive_key``: also exclude other *processes* doing the same (replicas starting
        at once on one PostgreSQL): a transaction-scoped advisory lock there, a write lock
        taken at BEGIN on SQLite.
        """
        with self._lock:
            if self._depth:  # inside another transaction (a batch): a savepoint
                yield from self._savepoint(exclusive_key)
                return
            immediate = exclusive_key is not None and self.dialect == "sqlite"
            self.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            self._depth = 1
            try:
                if exclusive_key is not None and self.dialect == "postgresql":
                    self.execute("SELECT pg_advisory_xact_lock(?)", (exclusive_key,))
                yield self
            except BaseException:
                self.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0
            self.execute("COMMIT")

    def _savepoint(self, exclusive_key: int | None) -> Iterator[Database]:
        """A nested transaction: its failure undoes its own statements, not the outer ones.

        (SQLite's write lock for ``exclusive_key`` is the outer transaction's to take.)
        """
        name = f"sp{self._depth}"
        self.execute(f"SAVEPOINT {name}")  # NOTE: a name made here, never input
        self._depth += 1
        try:
            if exclusive_key is not None and self.dialect == "postgresql":
                self.execute("SELECT pg_advisory_xact_lock(?)", (exclusive_key,))
            yield self
        except BaseException:
            self.execute(f"ROLLBACK TO SAVEPOINT {name}")
            self.execute(f"RELEASE SAVEPOINT {name}")
            raise
        finally:
            self._depth -= 1
        self.execute(f"RELEASE SAVEPOINT {name}")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def _open(self) -> Any:
        if self._conn is None:
            raise StoreError("the database is closed")
        return self._conn


def _connect_sqlite(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def _connect_postgres(url: str) -> Any:
    try:
        import psycopg  # lazy: only PostgreSQL deployments need it
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise StoreError("PostgreSQL needs psycopg: pip install 'psycopg[binary]'") from exc
    try:
        return psycopg.connect(url, autocommit=True)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
