"""Fleet state from the devices' own topics: status (retained), events, telemetry.

Everything lands in the registry; ``changed`` wakes whoever waits on the fleet
(a rollout waiting for its devices to reach a stage). Who sent a message is the
topic it came on (the broker's ACL ties a device to its own topics), never an id
inside the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable

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
        self.stats = {"events_handled": 0, "events_duplicate": 0}
        self._ticker: asyncio.Task[None] | None = None
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
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
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
            self.changed.notify_all()

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
            await asyncio.to_thread(self.registry.upsert_device, *parsed)
            await self._notify()

    async def _on_event(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, payload, "event")
        if parsed is None:
            return
        device_id, doc = parsed  # the topic, not the payload, says who sent it
        new = await asyncio.to_thread(
            self.registry.record_event, device_id, doc, event_key(doc, payload)
        )
        if not new:
            self.stats["events_duplicate"] += 1
            return
        self.stats["events_handled"] += 1
        if doc.get("stage") in (messages.FAILED, messages.REJECTED, messages.CHUNK_REJECTED):
            error = str(doc.get("error"))[:200]  # the device wrote it: keep the log readable
            logger.warning("device %s: %s %r", device_id, str(doc.get("stage"))[:40], error)
        await self._notify()

    async def _on_telemetry(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, payload, "telemetry")
        if parsed is None:
            return
        device_id, doc = parsed
        if not self.telemetry_limiter.allow(device_id):
            logger.warning("dropped telemetry from %s: more than its rate allows", device_id)
            return
        try:
            await asyncio.to_thread(self._record_telemetry, device_id, doc)
        except InvalidInputError as exc:
            logger.warning("dropped telemetry from %s: %s", device_id, exc)
            return
        if self.history is not None:
            self.history.add(device_id, doc, _model_versions(doc))

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
