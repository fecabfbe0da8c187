"""The control plane's fleet state: devices, their telemetry, rollouts and events.

A mixin of ``Registry`` (it shares the registry's one ``Database``); model
versions live in ``cloud.registry``.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from typing import Any

from cloud.database import Database
from cloud.telemetry import telemetry_increments
from common.errors import InvalidInputError, NotFoundError
from common.hardware import ONNX_PACKAGE, parse_hardware
from common.messages import CHUNK_REJECTED
from common.names import check_name

DEVICE_STATES = ("online", "offline")
MAX_EVENTS_PER_DEVICE = 500  # the newest are kept; a device cannot fill the disk


# Keys ``devices()`` sets beside each stored status.
LISTED_BESIDE_STATUS = ("last_seen", "telemetry")


class FleetRecords:
    """Devices, rollouts and events; ``_db`` is set by ``Registry``."""

    _db: Database

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._db.execute(sql, args)

    def batch(self) -> AbstractContextManager[Database]:
        """One transaction around many writes (``cloud.fleet`` stores a batch of messages);
        each write's own transaction becomes a savepoint inside it."""
        return self._db.transaction()

    # -- devices -------------------------------------------------------------------

    def upsert_device(self, device_id: str, status: dict[str, Any]) -> None:
        """Store a device's status; ``device_id`` is who sent it (its topic), not the payload."""
        check_name(device_id, "device id")
        state = status.get("state")
        status = {**status, "device_id": device_id}
        status["state"] = state if state in DEVICE_STATES else "unknown"
        status.pop("hardware_error", None)  # only this door writes it
        for key in LISTED_BESIDE_STATUS:  # the registry's own, not the device's word
            status.pop(key, None)
        try:
            status["hardware"] = parse_hardware(status.get("hardware")).to_dict()
        except InvalidInputError as exc:
            # The rest of the status stands; the device is treated as plain CPU (ONNX).
            status["hardware"] = {}
            status["hardware_error"] = str(exc)[:300]
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

    def devices_json(self) -> str:
        """``{"devices": devices()}`` as JSON text, spliced from the stored JSON texts.

        ``GET /api/devices`` lists the whole fleet: parsing and re-encoding every
        status and telemetry document cost most of its time (p99 121 ms for 1,000
        heartbeating devices), and it waited for any batch of fleet messages being
        written: it reads on the database's second connection now. Each stored status
        is a JSON object written by ``upsert_device`` (never empty: it holds the device
        id), and the keys appended here are the last ones, as in ``devices()``.
        """
        rows = self._db.read("SELECT status, last_seen, telemetry FROM devices ORDER BY device_id")
        items = ",".join(
            f'{s[:-1]},"last_seen":{json.dumps(seen)},"telemetry":{t or "null"}}}'
            for s, seen, t in rows
        )
        return f'{{"devices":[{items}]}}'

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

    def next_seqs(self, device_ids: list[str]) -> dict[str, int]:
        """``next_seq`` for many devices in one transaction (one commit, not one each)."""
        with self._db.transaction():
            return {d: self.next_seq(d) for d in device_ids}

    # -- rollouts and events ---------------------------------------------------------

    def create_rollout(
        self,
        rollout_id: str,
        name: str,
        version: str,
        targets: dict[str, str],
        packages: dict[str, str] | None = None,
    ) -> None:
        """``targets``: device -> command id; ``packages``: device -> the package it was
        sent (``common.hardware``: ``onnx`` or an engine id; ``onnx`` where absent)."""
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
                "INSERT INTO rollout_devices (rollout_id, device_id, command_id, stage, error,"
                " updated_at, package) VALUES (?,?,?,?,NULL,?,?)",
                [
                    (rollout_id, d, c, "sent", now, (packages or {}).get(d, ONNX_PACKAGE))
                    for d, c in targets.items()
                ],
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

    def rollout_packages(self, rollout_id: str) -> set[str]:
        """The package ids a rollout's devices were sent (to resume its broadcasts)."""
        rows = self._q(
            "SELECT DISTINCT package FROM rollout_devices WHERE rollout_id=?", (rollout_id,)
        )
        return {r[0] or ONNX_PACKAGE for r in rows}

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
            d: {"stage": s, "error": e, "command_id": c, "package": p or ONNX_PACKAGE}
            for d, s, e, c, p in self._q(
                "SELECT device_id, stage, error, command_id, package FROM rollout_devices"
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

    def rollout_devices_not_in(self, rollout_id: str, stages: tuple[str, ...]) -> int:
        """How many of a rollout's devices are in none of ``stages`` (one count query)."""
        marks = ",".join("?" * len(stages))
        rows = self._q(
            "SELECT COUNT(*) FROM rollout_devices WHERE rollout_id=?"
            f" AND stage NOT IN ({marks})",  # NOTE: placeholders only, values bound
            (rollout_id, *stages),
        )
        return int(rows[0][0])

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


def _text(value: object) -> str | None:
    return None if value is None else str(value)[:1000]
