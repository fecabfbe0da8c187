"""On-disk outbox for events and telemetry, so nothing is lost while the broker is away.

Messages go into SQLite first (committed before ``put`` returns) and a drain
task publishes them in order, deleting each only after the broker's PUBACK.
Delivery is therefore at least once: events carry ids for de-duplication.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from pathlib import Path

from common.mqtt import MqttError, MqttLink

logger = logging.getLogger(__name__)


class Outbox:
    """``async with Outbox(path, link)``: persists ``put`` and drains while connected."""

    def __init__(self, path: Path, link: MqttLink, *, max_rows: int = 10_000) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL)"
        )
        self._link = link
        self._max_rows = max_rows
        self._lock = asyncio.Lock()  # one writer of the connection at a time
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
        self._db.close()

    async def put(self, topic: str, payload: bytes, qos: int = 1) -> None:
        async with self._lock:
            await asyncio.to_thread(self._insert, topic, payload, qos)
        self._wakeup.set()

    def _insert(self, topic: str, payload: bytes, qos: int) -> None:
        self._db.execute(
            "INSERT INTO outbox (topic, payload, qos) VALUES (?, ?, ?)", (topic, payload, qos)
        )
        # Bounded: on a long outage the oldest messages go first.
        self._db.execute(
            "DELETE FROM outbox WHERE id <= (SELECT MAX(id) FROM outbox) - ?", (self._max_rows,)
        )

    def pending(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

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
            async with self._lock:
                rows = self._db.execute(
                    "SELECT id, topic, payload, qos FROM outbox ORDER BY id LIMIT 50"
                ).fetchall()
            if not rows:
                return
            for row_id, topic, payload, qos in rows:
                await self._link.publish(topic, payload, qos=qos)
                async with self._lock:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
