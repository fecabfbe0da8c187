"""On-disk outbox for events and telemetry, so nothing is lost while the broker is away.

Messages go into SQLite first (committed before ``put`` returns) and a drain
task publishes them in order, deleting each only after the broker's PUBACK.
Delivery is therefore at least once: events carry ids for de-duplication.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path

from common.errors import StoreError
from common.mqtt import MqttError, MqttLink

logger = logging.getLogger(__name__)


class Outbox:
    """``async with Outbox(path, link)``: persists ``put`` and drains while connected."""

    def __init__(self, path: Path, link: MqttLink, *, max_rows: int = 10_000) -> None:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL)"
        )
        self._db: sqlite3.Connection | None = db
        # NOTE: a thread lock, not an asyncio one: queries run in worker threads that
        # outlive a cancelled caller, and close() must wait for them.
        self._lock = threading.Lock()
        self._link = link
        self._max_rows = max_rows
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Outbox:
        self._task = asyncio.create_task(self._drain_forever(), name="outbox-drain")
        self._wakeup.set()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            if self._db is None:
                raise StoreError("the outbox is closed")
            return self._db.execute(sql, args).fetchall()

    async def put(self, topic: str, payload: bytes, qos: int = 1) -> None:
        await asyncio.to_thread(self._insert, topic, payload, qos)
        self._wakeup.set()

    def _insert(self, topic: str, payload: bytes, qos: int) -> None:
        self._run(
            "INSERT INTO outbox (topic, payload, qos) VALUES (?, ?, ?)", (topic, payload, qos)
        )
        # Bounded: on a long outage the oldest messages go first.
        self._run(
            "DELETE FROM outbox WHERE id <= (SELECT MAX(id) FROM outbox) - ?", (self._max_rows,)
        )

    def pending(self) -> int:
        return int(self._run("SELECT COUNT(*) FROM outbox")[0][0])

    async def flush(self, timeout: float) -> None:
        """Wait until everything queued so far is acknowledged (for tests and shutdown)."""
        async with asyncio.timeout(timeout):
            while self.pending():
                self._wakeup.set()
                await asyncio.sleep(0.05)

    async def _drain_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._link.connected.wait()
            try:
                await self._drain_once()
            except MqttError as exc:
                logger.debug("outbox drain paused: %s", exc)
                self._wakeup.set()
                await asyncio.sleep(0.5)

    async def _drain_once(self) -> None:
        while True:
            rows = await asyncio.to_thread(
                self._run, "SELECT id, topic, payload, qos FROM outbox ORDER BY id LIMIT 50"
            )
            if not rows:
                return
            for row_id, topic, payload, qos in rows:
                await self._link.publish(topic, payload, qos=qos)
                await asyncio.to_thread(self._run, "DELETE FROM outbox WHERE id = ?", (row_id,))
