"""The device's side of the hard-example loop: sample escalations, keep them, upload them.

When the local model was unsure (reason ``uncertain``) and the cloud answered,
the request and the cloud's answer are what the edge model should learn next.
A sampled share of them goes into a bounded SQLite store in the state
directory (so nothing is lost to a restart or an outage; the oldest go first
when it is full), and an upload task sends them to the control plane
(`POST /api/hard-examples/{model}?version=V`, with the device's own token) in
batches, deleting each batch once the control plane has taken it. A batch too
large for the control plane (413) is halved and sent again; one it refuses for
its data (400, 404, 422, or 413 for a single example) is dropped, since sending
it again would not help; anything else keeps it for later.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import threading
from pathlib import Path
from typing import Any

import aiohttp

from common.inference import InferRequest, InferResponse, request_to_rest, response_to_rest
from common.json_object import dumps_strict

logger = logging.getLogger(__name__)

MAX_EXAMPLE_BYTES = 256 * 1024  # one example as JSON; a bigger one is not kept
UPLOAD_BATCH = 64  # examples per upload (the control plane takes at most 256)
# The store on disk: max_rows of up to MAX_EXAMPLE_BYTES each could be 512 MB (2000 rows)
# of a device's card, and a client sends what sizes it likes.
MAX_STORE_BYTES = 64 * 1024**2
SAMPLED_REASONS = frozenset({"uncertain"})
# The control plane judged the data itself: sending it again cannot help. Anything else
# (no network, 401/403 until the token is fixed, 429, 5xx) keeps it for later.
DATA_REFUSED = frozenset({400, 404, 413, 422})  # heavy or load escalations teach the model nothing


class HardExampleStore:
    """``offer`` from the router's escalation path; ``run`` uploads in the background."""

    def __init__(
        self,
        path: Path,
        *,
        sample_rate: float = 1.0,
        max_rows: int = 2000,
        max_bytes: int = MAX_STORE_BYTES,
        rng: random.Random | None = None,
    ) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS examples (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " model TEXT NOT NULL, version TEXT NOT NULL, body BLOB NOT NULL)"
        )
        self._lock = threading.Lock()
        self.sample_rate = sample_rate
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._rng = rng or random.Random()
        self.uploaded = 0
        self.dropped = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def pending(self) -> int:
        return int(self._run("SELECT COUNT(*) FROM examples")[0][0])

    def offer(
        self, version: str, request: InferRequest, response: InferResponse, reason: str
    ) -> bool:
        """Keep this escalation if it is sampled; True if it was. Never raises."""
        if reason not in SAMPLED_REASONS or self._rng.random() >= self.sample_rate:
            return False
        try:
            doc = {
                "request": {"inputs": request_to_rest(request)["inputs"]},
                "response": response_to_rest(response),
            }
            body = dumps_strict(doc)  # ValueError on NaN: JSON has none
        except (ValueError, TypeError) as exc:  # e.g. NaN in the cloud's answer
            logger.debug("hard example not kept: %s", exc)
            return False
        if len(body) > MAX_EXAMPLE_BYTES:
            return False
        self._run(
            "INSERT INTO examples (model, version, body) VALUES (?, ?, ?)",
            (request.model, version, body),
        )
        self._run(
            "DELETE FROM examples WHERE id <= (SELECT id FROM examples ORDER BY id DESC"
            " LIMIT 1 OFFSET ?)",
            (self.max_rows,),
        )
        self._run(  # and the oldest past max_bytes, counted from the newest
            "DELETE FROM examples WHERE id <= (SELECT id FROM (SELECT id, SUM(LENGTH(body))"
            " OVER (ORDER BY id DESC) AS total FROM examples) WHERE total > ?"
            " ORDER BY id DESC LIMIT 1)",
            (self.max_bytes,),
        )
        return True

    def _batch(self, limit: int = UPLOAD_BATCH) -> list[tuple[int, str, str, bytes]]:
        first = self._run("SELECT model, version FROM examples ORDER BY id LIMIT 1")
        if not first:
            return []
        model, version = first[0]
        rows = self._run(
            "SELECT id, model, version, body FROM examples WHERE model=? AND version=?"
            " ORDER BY id LIMIT ?",
            (model, version, limit),
        )
        return [(int(i), str(m), str(v), bytes(b)) for i, m, v, b in rows]

    async def upload_once(
        self, session: aiohttp.ClientSession, control_url: str, token: str
    ) -> int:
        """Send what is stored, a batch at a time; the number of examples taken."""
        sent = 0
        limit = UPLOAD_BATCH
        while batch := await asyncio.to_thread(self._batch, limit):
            _, model, version, _ = batch[0]
            body = b'{"examples": [' + b",".join(b for *_, b in batch) + b"]}"
            url = f"{control_url.rstrip('/')}/api/hard-examples/{model}"
            async with session.post(
                url,
                data=body,
                params={"version": version},
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            ) as resp:
                status = resp.status
                detail = (await resp.text())[:200]
            ids = [i for i, *_ in batch]
            if status == 413 and len(ids) > 1:
                # Past the control plane's body or row limit: smaller batches, not a drop
                # (one large example must not take the 63 others in its batch with it).
                limit = len(ids) // 2
                continue
            if status == 201:
                sent += len(ids)
                self.uploaded += len(ids)
            elif status in DATA_REFUSED:
                logger.warning("control plane refused %d hard examples: %s", len(ids), detail)
                self.dropped += len(ids)
            else:
                logger.info("hard examples kept for later: HTTP %d", status)
                return sent
            await asyncio.to_thread(self._delete, ids)
        return sent

    def _delete(self, ids: list[int]) -> None:
        self._run(f"DELETE FROM examples WHERE id IN ({','.join('?' * len(ids))})", tuple(ids))

    async def run(self, control_url: str, token: str, interval_s: float = 30.0) -> None:
        """Upload every ``interval_s`` seconds, for as long as the agent runs."""
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await self.upload_once(session, control_url, token)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    logger.info("hard examples kept for later: %s", exc)

    def stats(self) -> dict[str, Any]:
        return {"pending": self.pending(), "uploaded": self.uploaded, "dropped": self.dropped}


def parse_settings(doc: object) -> dict[str, Any]:
    """The agent config's ``hard_examples`` object, checked (ValueError otherwise)."""
    if doc is None:
        return {}
    if not isinstance(doc, dict) or set(doc) - {"sample_rate", "max_rows", "upload_interval_s"}:
        raise ValueError("hard_examples takes sample_rate, max_rows and upload_interval_s")
    rate = doc.get("sample_rate", 1.0)
    rows = doc.get("max_rows", 2000)
    interval = doc.get("upload_interval_s", 30.0)
    if not (isinstance(rate, int | float) and 0 <= rate <= 1):
        raise ValueError("hard_examples.sample_rate must be in [0, 1]")
    if not (isinstance(rows, int) and 1 <= rows <= 1_000_000):
        raise ValueError("hard_examples.max_rows must be an integer in [1, 1000000]")
    if not (isinstance(interval, int | float) and 0.1 <= interval <= 86_400):
        raise ValueError("hard_examples.upload_interval_s must be in [0.1, 86400]")
    return {"sample_rate": float(rate), "max_rows": rows, "upload_interval_s": float(interval)}
