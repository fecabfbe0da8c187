"""Fleet state from the devices' own topics: status (retained), events, telemetry.

Everything lands in the registry; ``changed`` wakes whoever waits on the fleet
(a rollout waiting for its devices to reach a stage). Who sent a message is the
topic it came on (the broker's ACL ties a device to its own topics), never an id
inside the payload.

The MQTT handlers only parse and queue; one writer stores what has queued up in
one transaction per batch (each message in its own savepoint, so a bad one
undoes only itself), in arrival order, off the event loop. A 300-device rollout
sends ~1,500 events and statuses within seconds: one commit each, handled one at
a time by the dispatcher, delayed the broadcast and the end of the rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from cloud.registry import Registry
from cloud.serving_history import ServingHistory
from cloud.telemetry import TelemetryLimiter, version_reports
from common import messages, topics
from common.errors import InvalidInputError
from common.json_object import parse_json_object
from common.mqtt import MqttLink
from common.names import check_name

logger = logging.getLogger(__name__)

# A real status or event is a few KiB; the broker takes 4 MiB packets.
MAX_DEVICE_MESSAGE_BYTES = 64 * 1024
MAX_BATCH = 256  # messages per transaction: bounds how long the database lock is held
MAX_QUEUED = 10_000  # then the dispatcher waits (the broker holds the rest)
STATUS, EVENT, TELEMETRY = "status", "event", "telemetry"


@dataclass
class _Message:
    kind: str
    device_id: str
    doc: dict
    payload: bytes
    outcome: object = None  # what storing it returned, or the exception it raised


class FleetMonitor:
    def __init__(
        self,
        registry: Registry,
        link: MqttLink,
        *,
        telemetry_interval_s: float = 1.0,
        history: ServingHistory | None = None,
        share_group: str | None = None,
        poll_s: float = 1.0,
        gone: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        """``share_group``: replicas of one control plane name the same group, so that
        the broker hands each event and telemetry report to one of them ($share/...).

        ``poll_s``: ``changed`` also wakes this often, for what a replica wrote.

        ``gone``: the revoked devices (``RevokedDevices.gone``), read again every
        ``poll_s``: nothing they send is taken, and they are marked offline.
        """
        self.registry = registry
        self.history = history
        self.link = link
        self.changed = asyncio.Condition()
        self.telemetry_limiter = TelemetryLimiter(telemetry_interval_s)
        self.share_group = check_name(share_group, "share group") if share_group else None
        self.poll_s = poll_s
        self.stats = {"events_handled": 0, "events_duplicate": 0, "batches": 0}
        # Bumped at each notify: a waiter that checks off the loop compares it (see
        # ``wait_changed``) instead of holding the condition across a query.
        self.generation = 0
        self._ticker: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[_Message] = asyncio.Queue(MAX_QUEUED)
        self._gone_source = gone
        self._gone: frozenset[str] = frozenset()

    def _filter(self, kind: str) -> str:
        plain = topics.all_devices_filter(kind)
        # Status is retained and idempotent: every replica keeps the whole fleet's.
        if self.share_group is None or kind == "status":
            return plain
        return topics.shared(plain, self.share_group)

    async def __aenter__(self) -> FleetMonitor:
        await self._forget_revoked()  # before the broker replays their retained status
        self.link.subscribe(self._filter("status"), self._on_status)
        self.link.subscribe(self._filter("events"), self._on_event)
        self.link.subscribe(self._filter("telemetry"), self._on_telemetry)
        self._ticker = asyncio.create_task(self._tick(), name="fleet-tick")
        self._writer = asyncio.create_task(self._write_forever(), name="fleet-writer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(TimeoutError):  # what has come in is stored before we go
            await asyncio.wait_for(self.drain(), 5)
        for task in (self._ticker, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for kind in ("status", "events", "telemetry"):
            self.link.unsubscribe(self._filter(kind))

    async def _tick(self) -> None:
        """Wake waiters now and then: a replica may have moved a rollout on in the DB."""
        while True:
            await asyncio.sleep(self.poll_s)
            await self._forget_revoked()
            await self._notify()

    async def _forget_revoked(self) -> None:
        """Mark devices revoked since the last look offline (their retained status on the
        broker still says online), and refuse what they send from now on."""
        if self._gone_source is None:
            return
        try:
            gone = await asyncio.to_thread(self._gone_source)
        except InvalidInputError as exc:  # a damaged file: keep the set held
            logger.warning("revoked devices not read: %s", exc)
            return
        new, self._gone = gone - self._gone, gone
        if new:
            await asyncio.to_thread(self._mark_offline, new)
            logger.info("revoked devices left the fleet: %s", ", ".join(sorted(new)[:20]))

    def _still_gone(self, device_id: str) -> bool:
        """Read again (two stats while nothing changed): enrolled again, it is heard at once."""
        assert self._gone_source is not None  # nothing is in _gone without it
        try:
            return device_id in self._gone_source()
        except InvalidInputError:
            return True

    def _mark_offline(self, devices: frozenset[str]) -> None:
        for status in self.registry.devices():
            if status.get("device_id") in devices and status.get("state") != "offline":
                self.registry.upsert_device(
                    status["device_id"], {"state": "offline", "revoked": True}
                )

    async def _notify(self) -> None:
        async with self.changed:
            self.generation += 1
            self.changed.notify_all()

    async def wait_changed(self, since: int) -> None:
        """Return once ``generation`` has moved past ``since`` (a notify since then)."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.generation != since)

    def _parse(self, topic: str, payload: bytes, what: str) -> tuple[str, dict] | None:
        if len(payload) > MAX_DEVICE_MESSAGE_BYTES:  # before parsing: stored and served whole
            logger.warning("ignored %s on %s: %d bytes", what, topic, len(payload))
            return None
        try:
            # topics.parse checks the device id (common.names) on the way.
            device_id = topics.parse(topic).ident
            if device_id in self._gone and self._still_gone(device_id):
                # its login works until the broker is reloaded
                logger.debug("ignored %s of revoked device %s", what, device_id)
                return None
            return device_id, parse_json_object(payload, what)
        except ValueError as exc:
            logger.warning("ignored %s on %s: %s", what, topic, exc)
            return None

    async def _on_status(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, payload, "status")
        if parsed is not None:
            await self._queue.put(_Message(STATUS, *parsed, payload))

    async def _on_event(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, payload, "event")
        if parsed is not None:  # the topic, not the payload, says who sent it
            await self._queue.put(_Message(EVENT, *parsed, payload))

    async def _on_telemetry(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, payload, "telemetry")
        if parsed is None:
            return
        if not self.telemetry_limiter.allow(parsed[0]):
            logger.warning("dropped telemetry from %s: more than its rate allows", parsed[0])
            return
        await self._queue.put(_Message(TELEMETRY, *parsed, payload))

    async def drain(self) -> None:
        """Wait until every message queued so far is stored (tests, shutdown)."""
        await self._queue.join()

    async def _write_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await asyncio.to_thread(self._store, batch)
                self.stats["batches"] += 1
                self._after(batch)
            except Exception:  # NOTE: broad on purpose: the writer must outlive one batch
                logger.exception("storing %d fleet messages failed", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()
            if any(msg.kind != TELEMETRY for msg in batch):  # telemetry moves no rollout
                await self._notify()

    def _store(self, batch: list[_Message]) -> None:
        """One transaction for the batch; each message in its own savepoint (worker thread).

        In device order (a stable sort keeps each device's own order): every row a
        message locks belongs to its device, so two replicas' batches on one PostgreSQL
        take their locks in the same order. A message that failed for the database's
        sake (a deadlock with some other transaction, a failed commit) is then stored
        alone, in its own transaction, as it was before batches; a refused one is not.
        """
        ordered = sorted(batch, key=lambda msg: msg.device_id)
        try:
            with self.registry.batch() as db:
                for msg in ordered:
                    try:
                        with db.transaction():
                            msg.outcome = self._store_one(msg)
                    except Exception as exc:  # NOTE: one failed message undoes only itself
                        msg.outcome = exc
        except Exception as exc:  # the batch itself (its commit): every message again
            for msg in ordered:
                msg.outcome = exc
        for msg in ordered:
            if isinstance(msg.outcome, Exception) and not isinstance(
                msg.outcome, InvalidInputError
            ):
                logger.info("storing %s from %s alone: %r", msg.kind, msg.device_id, msg.outcome)
                try:
                    msg.outcome = self._store_one(msg)
                except Exception as exc:
                    msg.outcome = exc

    def _store_one(self, msg: _Message) -> object:
        """What storing returned: for an event, whether it was new."""
        if msg.kind == EVENT:
            key = event_key(msg.doc, msg.payload)
            return self.registry.record_event(msg.device_id, msg.doc, key)
        if msg.kind == STATUS:
            self.registry.upsert_device(msg.device_id, msg.doc)
        else:
            self._record_telemetry(msg.device_id, msg.doc)
        return None

    def _after(self, batch: list[_Message]) -> None:
        """On the loop: counters, log lines and serving history for what was stored."""
        for msg in batch:
            if isinstance(msg.outcome, InvalidInputError) and msg.kind == TELEMETRY:
                logger.warning("dropped telemetry from %s: %s", msg.device_id, msg.outcome)
            elif isinstance(msg.outcome, Exception):
                logger.error("storing %s from %s failed: %r", msg.kind, msg.device_id, msg.outcome)
            elif msg.kind == EVENT:
                self._after_event(msg.device_id, msg.doc, bool(msg.outcome))
            elif msg.kind == TELEMETRY and self.history is not None:
                self.history.add(msg.device_id, msg.doc, _model_versions(msg.doc))

    def _after_event(self, device_id: str, doc: dict, new: bool) -> None:
        if not new:
            self.stats["events_duplicate"] += 1
            return
        self.stats["events_handled"] += 1
        if doc.get("stage") in (messages.FAILED, messages.REJECTED, messages.CHUNK_REJECTED):
            error = str(doc.get("error"))[:200]  # the device wrote it: keep the log readable
            logger.warning("device %s: %s %r", device_id, str(doc.get("stage"))[:40], error)

    def _record_telemetry(self, device_id: str, doc: dict) -> None:
        """The fleet totals, and the per-version figures that the rollout gates judge."""
        reports = version_reports(doc, self.registry.staged.device_models(device_id))
        for model, version, _ in reports:  # all checked before anything is stored
            check_name(model, "telemetry model")
            check_name(version, "telemetry version")
        self.registry.record_telemetry(device_id, doc)
        for model, version, figures in reports:
            self.registry.staged.add_version_telemetry(device_id, model, version, figures)


def event_key(doc: dict, payload: bytes) -> str:
    """What makes an event the same event: its ``event_id``, else its exact bytes."""
    event_id = doc.get("event_id")
    if isinstance(event_id, str) and 8 <= len(event_id) <= 64 and event_id.isalnum():
        return event_id
    return hashlib.sha256(payload).hexdigest()


def _model_versions(doc: dict) -> list[tuple[str, dict]]:
    """(``name:version``, router stats) per model a telemetry report covers, valid ones only.

    Agents serving several models report each under ``models``; older agents one
    ``router`` for their ``model``.
    """
    per_model = doc.get("models")
    if not isinstance(per_model, dict):
        per_model = {doc.get("model"): doc.get("router")}
    out = []
    for name, stats in list(per_model.items())[:64]:
        if not isinstance(stats, dict):
            continue
        try:
            model = check_name(name, "model name")
            version = check_name(str(stats.get("local_version")), "model version")
        except InvalidInputError:
            continue
        out.append((f"{model}:{version}", stats))
    return out
