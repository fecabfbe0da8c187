"""Fleet state from the devices' own topics: status (retained), events, telemetry.

Everything lands in the registry; ``changed`` wakes whoever waits on the fleet
(a rollout waiting for its devices to reach a stage). Who sent a message is the
topic it came on (the broker's ACL ties a device to its own topics), never an id
inside the payload.
"""

from __future__ import annotations

import asyncio
import logging

from cloud.registry import Registry
from cloud.serving_history import ServingHistory
from cloud.telemetry import TelemetryLimiter
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
    ) -> None:
        self.registry = registry
        self.history = history
        self.link = link
        self.changed = asyncio.Condition()
        self.telemetry_limiter = TelemetryLimiter(telemetry_interval_s)

    async def __aenter__(self) -> FleetMonitor:
        # NOTE: replicas of the control plane would use topics.shared(...) here so that
        # each event is handled once; with one process a plain subscription is right.
        self.link.subscribe(topics.all_devices_filter("status"), self._on_status)
        self.link.subscribe(topics.all_devices_filter("events"), self._on_event)
        self.link.subscribe(topics.all_devices_filter("telemetry"), self._on_telemetry)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for kind in ("status", "events", "telemetry"):
            self.link.unsubscribe(topics.all_devices_filter(kind))

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    @staticmethod
    def _parse(topic: str, payload: bytes, what: str) -> tuple[str, dict] | None:
        if len(payload) > MAX_DEVICE_MESSAGE_BYTES:  # before parsing: stored and served whole
            logger.warning("ignored %s on %s: %d bytes", what, topic, len(payload))
            return None
        try:
            # topics.parse checks the device id (common.names) on the way.
            return topics.parse(topic).ident, parse_json_object(payload, what)
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
        await asyncio.to_thread(self.registry.record_event, device_id, doc)
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
            await asyncio.to_thread(self.registry.record_telemetry, device_id, doc)
        except InvalidInputError as exc:
            logger.warning("dropped telemetry from %s: %s", device_id, exc)
            return
        if self.history is not None:
            self.history.add(device_id, doc, _model_version(doc))


def _model_version(doc: dict) -> str | None:
    """``name:version`` of the model a telemetry report is about, if it says so validly."""
    router = doc.get("router") if isinstance(doc.get("router"), dict) else {}
    try:
        name = check_name(doc.get("model"), "model name")
        version = check_name(str(router.get("local_version")), "model version")
    except InvalidInputError:
        return None
    return f"{name}:{version}"
