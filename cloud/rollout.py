"""Rollout controller: signed deploy commands, one broadcast of chunks, targeted repair.

The artifact is published once on ``artifacts/{a}/chunks`` after the targeted
agents have subscribed (their ``downloading`` event); an agent that missed
chunks asks for them on ``artifacts/{a}/requests/{d}`` and gets just those, on
``artifacts/{a}/repairs/{d}`` (or on the broadcast again when more than half
the rollout lacks them). So the control plane's cost grows with the artifact,
not with artifact x devices, and one slow device's repairs reach only it.

Chunks are cut as the signed manifest says (``manifest.chunks.size``), so that
each matches its signed hash. The MQTT handler only checks a request's size and
queues it; one worker parses them off the dispatcher and ``cloud.repair``
decides what, if anything, is resent and to whom.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Any

from cloud.engine_records import is_engine
from cloud.fleet import FleetMonitor
from cloud.registry import Registry, VersionRecord
from cloud.repair import RepairLimiter, RepairPolicy, parse_request
from common import chunking, topics
from common.errors import ConflictError, FoglineError, InvalidInputError
from common.hardware import choose_package, parse_hardware, parse_runtimes, trt_major_minor
from common.messages import FAILED, REJECTED, STAGES, Command, sign_command
from common.mqtt import MqttError, MqttLink
from common.signing import Signer

logger = logging.getLogger(__name__)

TERMINAL = ("activated", FAILED, REJECTED)
BROADCAST_WINDOW = 64  # chunks published and not yet acknowledged, at most
# Stages at or after which an agent is subscribed to the chunk topic.
SUBSCRIBED = (*STAGES[STAGES.index("downloading") :], FAILED, REJECTED)


class RolloutController:
    def __init__(
        self,
        registry: Registry,
        fleet: FleetMonitor,
        signer: Signer,
        link: MqttLink,
        *,
        chunk_size: int = chunking.DEFAULT_CHUNK_SIZE,
        command_ttl_s: float = 3600.0,
        subscribe_wait_s: float = 10.0,
        rollout_timeout_s: float = 300.0,
        artifact_base_url: str | None = None,
        repair: RepairPolicy | None = None,
        enrolled: Callable[[], Iterable[str]] | None = None,
        resend_after_s: float = 5.0,
        resend_max_s: float = 120.0,
        share_group: str | None = None,
    ) -> None:
        """``chunk_size`` serves only packages signed before manifests listed their chunks.

        ``enrolled`` lists enrolled device ids: they may be targeted before they are seen.
        ``share_group``: replicas of one control plane name the same group, so that each
        repair request reaches one of them ($share/...), not every replica resending it.
        """
        self.share_group = share_group
        self.enrolled = enrolled
        self.resend_after_s = resend_after_s  # first resend of an unanswered command
        self.resend_max_s = resend_max_s  # the backoff doubles up to this
        self.registry = registry
        self.fleet = fleet
        self.signer = signer
        self.link = link
        self.legacy_chunk_size = chunk_size
        self.command_ttl_s = command_ttl_s
        self.subscribe_wait_s = subscribe_wait_s
        self.rollout_timeout_s = rollout_timeout_s
        self.artifact_base_url = artifact_base_url  # HTTP transport: {base}/api/artifacts/{a}
        self.stats = {
            "chunks_broadcast": 0,
            "chunks_repaired": 0,  # resent, broadcast or to one device
            "chunks_repaired_unicast": 0,  # of which to the asking device alone
            "bytes_sent": 0,
            "repair_requests_dropped": 0,  # too big, malformed, unknown, or queue full
            "repair_requests_limited": 0,  # over its claimed device's rate
            "chunks_not_resent": 0,  # asked for, but just sent or over the artifact's budget
            "commands_resent": 0,  # deploy commands a device had not answered
            "chunks_unacknowledged": 0,  # no PUBACK in time from a broker still connected
        }
        self._tasks: set[asyncio.Task[None]] = set()
        self._audience: Counter[str] = Counter()  # digest -> devices of rollouts driven here
        self._limiter = RepairLimiter(repair or RepairPolicy())
        self._requests: asyncio.Queue[tuple[topics.Topic, bytes]] = asyncio.Queue(
            self._limiter.policy.queue_size
        )

    async def __aenter__(self) -> RolloutController:
        self._spawn(self._repair_worker(), "repair")
        self._spawn(self._resend_loop(), "resend")
        # A retained request would be replayed at every reconnect: only live ones count.
        requests = topics.repair_filter("requests")
        if self.share_group is not None:
            requests = topics.shared(requests, self.share_group)
        self.link.subscribe(requests, self._on_request, retained=False)
        for rollout_id, name, version in await asyncio.to_thread(self.registry.running_rollouts):
            # Interrupted by a restart: its commands are out; drive it to the end again.
            logger.info("resuming rollout %s (%s %s)", rollout_id, name, version)
            packages = self.registry.packages(name, version)
            used = self.registry.rollout_packages(rollout_id)
            self._spawn_drive(rollout_id, [r for p, r in packages.items() if p in used])
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- starting a rollout ----------------------------------------------------------

    def online_devices(self) -> list[str]:
        return [d["device_id"] for d in self.registry.devices() if d.get("state") == "online"]

    async def start(
        self,
        name: str,
        version: str,
        devices: list[str] | None = None,
        *,
        allow_downgrade: bool = False,
    ) -> str:
        packages = await asyncio.to_thread(self.registry.packages, name, version)
        targets = devices if devices else self.online_devices()
        if not targets:
            raise InvalidInputError("no target devices: none given and none online")
        await self.check_known(targets)
        rollout_id = uuid.uuid4().hex[:12]
        chosen = await asyncio.to_thread(self.choose_packages, targets, packages)
        # NOTE: off the event loop: a sequence number, a copy of the package and a
        # signature per device took ~30 ms each there (300 devices: seconds of a frozen API).
        signed = await asyncio.to_thread(
            self._sign_deploys, targets, packages, chosen, allow_downgrade
        )
        await asyncio.to_thread(
            self.registry.create_rollout,
            rollout_id,
            name,
            version,
            {d: command_id for d, (command_id, _) in signed.items()},
            chosen,
        )
        # Kept until the device answers: resent with backoff if it never does.
        await asyncio.to_thread(
            self.registry.staged.remember_commands, rollout_id, signed, self.resend_after_s
        )
        try:
            await self._publish_commands(signed)
        except MqttError:
            # The operator gets a 503 and a rollout marked failed, not one that hangs.
            await asyncio.to_thread(self.registry.finish_rollout, rollout_id, "failed")
            raise
        logger.info("rollout %s: %s %s to %d devices", rollout_id, name, version, len(targets))
        self._spawn_drive(rollout_id, [packages[p] for p in sorted(set(chosen.values()))])
        return rollout_id

    def choose_packages(
        self, targets: list[str], packages: dict[str, VersionRecord]
    ) -> dict[str, str]:
        """device -> package id: per device, the engine built for its reported GPU and
        TensorRT (``common.hardware.choose_package``), else the ONNX package.

        NOTE: the device's word picks the package, never whether it is trusted: an agent
        checks an engine against its own hardware and refuses one that does not fit.
        """
        engines = {}
        for package, record in packages.items():
            t = record.manifest.target
            if is_engine(record.manifest) and t.compute_capability and t.tensorrt_version:
                engines[(t.compute_capability, trt_major_minor(t.tensorrt_version))] = package
        statuses = {d["device_id"]: d for d in self.registry.devices()}
        chosen = {}
        for device in targets:
            status = statuses.get(device) or {}
            try:
                hardware = parse_hardware(status.get("hardware"))
            except InvalidInputError:
                hardware = None  # stored statuses were checked at the door; older ones not
            chosen[device] = choose_package(
                hardware, parse_runtimes(status.get("runtimes")), engines
            )
        return chosen

    async def check_known(self, targets: list[str]) -> None:
        """Refuse ids never seen and not enrolled, before any row or command exists.

        A typo used to get a signed command, a phantom device row and a rollout
        that sat "running" until its timeout.
        """
        known = await asyncio.to_thread(self.registry.seen_devices, targets)
        if self.enrolled is not None:
            known |= set(await asyncio.to_thread(self.enrolled)) & set(targets)
        unknown = sorted(set(targets) - known)
        if unknown:
            raise InvalidInputError(f"unknown device ids (never seen, not enrolled): {unknown}")

    async def abort(self, rollout_id: str) -> None:
        """Mark a running rollout ``aborted`` and stop driving it (commands out stay out)."""
        await asyncio.to_thread(self.registry.rollout, rollout_id)  # NotFoundError if none
        if not await asyncio.to_thread(self.registry.finish_rollout, rollout_id, "aborted"):
            raise ConflictError(f"rollout {rollout_id} is not running")
        for task in list(self._tasks):
            if task.get_name() == f"rollout-{rollout_id}":
                task.cancel()
        logger.info("rollout %s aborted", rollout_id)

    def _spawn_drive(self, rollout_id: str, records: list[VersionRecord]) -> None:
        self._spawn(self._drive(rollout_id, records), f"rollout-{rollout_id}")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def chunk_size(self, record: VersionRecord) -> int:
        """The signed chunk size (a legacy package: this controller's setting)."""
        chunks = record.manifest.chunks
        return chunks.size if chunks is not None else self.legacy_chunk_size

    def _sign_deploys(
        self,
        targets: list[str],
        packages: dict[str, VersionRecord],
        chosen: dict[str, str],
        allow_downgrade: bool,
    ) -> dict[str, tuple[str, bytes]]:
        """device -> (command id, signed deploy command); a worker thread's job."""
        seqs = self.registry.next_seqs(targets)
        docs = {p: packages[p].signed.to_dict() for p in set(chosen.values())}  # once each
        out = {}
        for device_id in targets:
            package = chosen[device_id]
            cmd = self._deploy_command(
                device_id, packages[package], allow_downgrade, seqs[device_id], docs[package]
            )
            out[device_id] = (cmd.id, sign_command(cmd, self.signer))
        return out

    async def _publish_commands(self, signed: dict[str, tuple[str, bytes]]) -> None:
        """Every device's command, a window of them awaiting PUBACKs at once (not one
        round trip after another); the first failure cancels the rest."""
        window = asyncio.Semaphore(BROADCAST_WINDOW)

        async def send(device_id: str, payload: bytes) -> None:
            async with window:
                await self.link.publish(topics.device_topic(device_id, "commands"), payload)

        try:
            async with asyncio.TaskGroup() as group:
                for device_id, (_, payload) in signed.items():
                    group.create_task(send(device_id, payload))
        except* MqttError as failed:
            raise failed.exceptions[0] from None

    def _deploy_command(
        self,
        device_id: str,
        record: VersionRecord,
        allow_downgrade: bool,
        seq: int,
        package: dict[str, Any],
    ) -> Command:
        body: dict[str, Any] = {
            "package": package,
            "artifact": {
                "digest": record.artifact_digest,
                "size": record.artifact_size,
                "chunk_size": self.chunk_size(record),  # agents read the signed one
            },
            "allow_downgrade": allow_downgrade,
        }
        if self.artifact_base_url:
            url = f"{self.artifact_base_url.rstrip('/')}/api/artifacts/{record.artifact_digest}"
            body["artifact"]["http_url"] = url
        return Command(
            "deploy",
            device_id,
            seq,
            time.time() + self.command_ttl_s,
            body,
        )

    # -- driving it ----------------------------------------------------------------------

    async def _wait_for(self, rollout_id: str, stages: tuple[str, ...], timeout: float) -> bool:
        """Wait until every device of the rollout is in one of ``stages``.

        The check is one count query in a worker thread, made again after each batch
        of fleet messages (and the fleet's periodic tick), never on the event loop.
        """

        def done() -> bool:
            return self.registry.rollout_devices_not_in(rollout_id, stages) == 0

        with suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while True:
                    seen = self.fleet.generation
                    if await asyncio.to_thread(done):
                        return True
                    await self.fleet.wait_changed(seen)
        return await asyncio.to_thread(done)

    async def _drive(self, rollout_id: str, records: list[VersionRecord]) -> None:
        """One broadcast per package the rollout sent (the ONNX one, engines), then wait."""
        targets = len((await asyncio.to_thread(self.registry.rollout, rollout_id))["devices"])
        audience = Counter({r.artifact_digest: targets for r in records})
        self._audience.update(audience)  # how many may ask: decides unicast or broadcast
        for record in records:  # until its broadcast, a request waits for it (red team:
            # one device asking for everything made the control plane send it all twice)
            count = chunking.chunk_count(record.artifact_size, self.chunk_size(record))
            self._limiter.begin_broadcast(record.artifact_digest, range(count))
        try:
            await self._wait_for(rollout_id, SUBSCRIBED, self.subscribe_wait_s)
            try:
                await self.link.connected.wait()
                for record in records:
                    await self.broadcast(record)
            except MqttError as exc:  # broker gone mid-broadcast: agents ask for what they lack
                logger.warning("rollout %s: broadcast interrupted: %s", rollout_id, exc)
            await self._wait_for(rollout_id, TERMINAL, self.rollout_timeout_s)
        finally:
            for record in records:
                self._limiter.end_broadcast(record.artifact_digest)
            self._audience.subtract(audience)
            self._audience += Counter()  # drops the zeros
            for digest in set(audience) - set(self._audience):
                self._limiter.forget_askers(digest)
        devices = (await asyncio.to_thread(self.registry.rollout, rollout_id))["devices"].values()
        ok = sum(d["stage"] == "activated" for d in devices)
        state = "succeeded" if ok == len(devices) else ("failed" if ok == 0 else "partial")
        if not all(d["stage"] in TERMINAL for d in devices):
            state = "timed_out"
        if await asyncio.to_thread(self.registry.finish_rollout, rollout_id, state):
            logger.info("rollout %s %s (%d/%d activated)", rollout_id, state, ok, len(devices))

    async def broadcast(self, record: VersionRecord, only: list[int] | None = None) -> None:
        """Publish every chunk of the artifact, or just the indices in ``only``."""
        digest = record.artifact_digest
        topic = topics.artifact_topic(digest, "chunks")
        if only is not None:
            await self._send_chunks(record, topic, only, "chunks_repaired")
            return
        count = chunking.chunk_count(record.artifact_size, self.chunk_size(record))
        try:
            await self._send_chunks(record, topic, range(count), "chunks_broadcast")
        finally:  # what it did not get out (the broker gone) is asked for, and broadcast
            self._limiter.end_broadcast(digest)

    async def send_to(self, record: VersionRecord, device_id: str, indices: list[int]) -> None:
        """Resend ``indices`` to one device alone, on its repair topic."""
        topic = topics.repair_topic(record.artifact_digest, "repairs", device_id)
        await self._send_chunks(record, topic, indices, "chunks_repaired")
        self.stats["chunks_repaired_unicast"] += len(indices)

    async def _send_chunks(
        self, record: VersionRecord, topic: str, indices: Iterable[int], stat: str
    ) -> None:
        digest = record.artifact_digest
        data = await asyncio.to_thread(self.registry.artifact_path(digest).read_bytes)
        size = self.chunk_size(record)
        broadcast = topics.parse(topic).kind == "chunks"
        window = asyncio.Semaphore(BROADCAST_WINDOW)

        async def send(index: int) -> None:
            async with window:
                payload = chunking.chunk_at(data, index, size).encode()
                try:
                    await self.link.publish(topic, payload)
                except MqttError:
                    if not self.link.connected.is_set():
                        raise  # the broker is gone: stop; agents ask for what they lack
                    # Connected but slow to acknowledge (a loaded broker fanning each chunk
                    # out to hundreds): the chunk is on its way, and giving up the whole
                    # broadcast left every device to ask for the rest (300 devices: half
                    # gave up). Carry on; a device that lacks it asks.
                    self.stats["chunks_unacknowledged"] += 1
            if broadcast:
                self._limiter.mark_sent(digest, [index], time.monotonic())
            self.stats[stat] += 1
            self.stats["bytes_sent"] += len(payload)

        # NOTE: a window of chunks in flight, not one PUBACK round trip per chunk (which
        # made a 25 MB rollout to one device 5x slower than plain paho); the broker gone
        # cancels the rest, and agents ask for what they lack.
        try:
            async with asyncio.TaskGroup() as group:
                for index in indices:
                    group.create_task(send(index))
        except* MqttError as failed:
            raise failed.exceptions[0] from None

    async def _resend_loop(self) -> None:
        """Resend, with doubling backoff, each deploy command its device has not answered.

        A command can be lost between broker and device (a broker restart without
        persistence, a session the device cleaned); the same signed payload goes out
        again, so a device that did get it refuses it as a replay. Of two replicas one
        resends: ``claim_resend`` is a compare-and-set on the row.
        """
        store = self.registry.staged
        pruned_at = 0.0
        while True:
            await asyncio.sleep(min(1.0, self.resend_after_s))
            if time.monotonic() - pruned_at > 3600:  # event ids older than a week
                pruned_at = time.monotonic()
                with suppress(FoglineError):
                    await asyncio.to_thread(store.forget_handled_events)
            if not self.link.connected.is_set():
                continue
            try:
                for command_id, device_id, payload, attempts, at in await asyncio.to_thread(
                    store.due_commands
                ):
                    backoff = min(self.resend_after_s * 2 ** (attempts + 1), self.resend_max_s)
                    claimed = await asyncio.to_thread(
                        store.claim_resend, command_id, at, time.time() + backoff
                    )
                    if claimed:
                        topic = topics.device_topic(device_id, "commands")
                        await self.link.publish(topic, payload.encode())
                        self.stats["commands_resent"] += 1
                        logger.info("resent command %s to %s", command_id, device_id)
            except (MqttError, FoglineError) as exc:
                logger.info("resending commands interrupted: %s", exc)

    # -- MQTT handlers ---------------------------------------------------------------------

    def _on_request(self, topic: str, payload: bytes) -> None:
        """On the MQTT dispatcher: a size check, the device's rate, a queue slot.

        NOTE: red team: the rate is checked here, before the shared queue, by the
        topic's device id (the broker's): checked after it, one device's login
        publishing as fast as it could filled the queue and others' requests were dropped.
        """
        if len(payload) > self._limiter.policy.max_request_bytes:
            logger.warning("dropped a %d-byte chunk request on %s", len(payload), topic)
            self.stats["repair_requests_dropped"] += 1
            return
        try:
            parsed = topics.parse(topic)  # once, here: the worker takes the parsed topic
        except ValueError:
            parsed = None
        if parsed is None or parsed.kind != "requests" or parsed.device is None:
            self.stats["repair_requests_dropped"] += 1
            return
        if not self._limiter.admit_device(parsed.device, time.monotonic()):
            self.stats["repair_requests_limited"] += 1
            return
        try:
            self._requests.put_nowait((parsed, payload))
        except asyncio.QueueFull:
            self.stats["repair_requests_dropped"] += 1

    async def _repair_worker(self) -> None:
        while True:
            asked, payload = await self._requests.get()
            try:
                await self._repair(asked, payload)
            except MqttError as exc:  # the agent will ask again
                logger.info("repair for %s interrupted: %s", asked.device, exc)
            except Exception:  # NOTE: broad on purpose: one bad request must not end repairs
                logger.exception("repair for %s failed", asked.device)

    async def _repair(self, asked: topics.Topic, payload: bytes) -> None:
        """Resend what a device lacks, within the limits of ``cloud.repair``.

        ``asked``: the request's topic, parsed on the dispatcher (a device's request).
        """
        policy = self._limiter.policy
        digest, device_id = asked.ident, str(asked.device)
        topic = f"{digest[:12]}.../requests/{device_id}"  # for the log
        try:
            request = await asyncio.to_thread(
                parse_request, payload, chunking.MAX_SIGNED_CHUNKS, policy.max_request_bytes
            )
            if request.device_id != device_id:
                raise InvalidInputError(f"request names {request.device_id!r} on {topic}")
            record = await asyncio.to_thread(self.registry.version_by_digest, digest)
            count = chunking.chunk_count(record.artifact_size, self.chunk_size(record))
            if request.missing and request.missing[-1] >= count:
                raise InvalidInputError(f"chunk {request.missing[-1]} of {count}")
        except (ValueError, LookupError) as exc:
            logger.info("ignored chunk request on %s: %s", topic, exc)
            self.stats["repair_requests_dropped"] += 1
            return
        plan = self._limiter.plan(
            digest, count, device_id, request.missing, time.monotonic(), self._audience[digest]
        )
        resent = len(plan.broadcast) + len(plan.unicast)
        self.stats["chunks_not_resent"] += len(request.missing) - resent
        if plan.broadcast:
            await self.broadcast(record, only=plan.broadcast)
        if plan.unicast:
            await self.send_to(record, device_id, plan.unicast)
