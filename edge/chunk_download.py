"""One artifact's download from its MQTT chunk broadcast, with targeted repair.

Chunks are checked one by one against the signed chunk list (when the package
has one), so a forged copy, live or retained, never takes a real chunk's place.
When the broadcast goes quiet, the device asks for exactly the chunks it lacks,
on its own request topic, and they come back on its own repair topic (or, when
many devices lack them, on the broadcast again).
Used by the agent's Deployer and by the fleet simulator (`bench/sim_agent.py`),
so that a simulated device downloads and verifies exactly as a real one does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from common import chunking, topics
from common.chunking import Assembler
from common.errors import VerificationError
from common.messages import chunk_request
from common.mqtt import MqttError, MqttLink

logger = logging.getLogger(__name__)

MAX_REPAIR_ROUNDS = 10  # requests for missing chunks before giving up on MQTT (default)
MAX_BACKOFF = 8  # unanswered requests wait up to this many chunk timeouts for the next
MAX_DOWNLOAD_S = 600.0  # however long a broker outage lasts, stop waiting after this
MAX_REJECTION_EVENTS = 3  # per download: a flood of forged chunks must not flood the outbox
PROGRESS_STEP_PCT = 25  # ``on_progress`` each time this much more of the artifact has come

Report = Callable[[str], Awaitable[None]]


class ChunkDownload:
    """``await ChunkDownload(...).run(started)``: the artifact's bytes, or VerificationError."""

    def __init__(
        self,
        link: MqttLink,
        device_id: str,
        digest: str,
        size: int,
        chunk_size: int,
        hashes: list[str] | None,
        *,
        chunk_timeout_s: float,
        repair_rounds: int = MAX_REPAIR_ROUNDS,
        on_rejected: Report,
        on_progress: Callable[[int], Awaitable[None]] | None = None,
        keep: bool = True,
    ) -> None:
        self._link, self._device_id, self._digest = link, device_id, digest
        self._asm = Assembler(size, chunk_size, hashes, keep=keep)
        self._timeout_s = chunk_timeout_s
        self._repair_rounds = repair_rounds
        self._on_rejected = on_rejected
        self._on_progress = on_progress
        self._reported = 0  # the percent last reported
        self._progress = asyncio.Event()
        self.rejected = 0

    @property
    def chunks(self) -> int:
        return self._asm.count

    async def _on_chunk(self, _topic: str, payload: bytes) -> None:
        try:
            if self._asm.add(chunking.decode(payload)):
                self._progress.set()
                await self._report_progress()
        except VerificationError as exc:
            self.rejected += 1
            if self.rejected <= MAX_REJECTION_EVENTS:
                await self._on_rejected(str(exc))
            logger.debug("chunk refused (%d so far): %s", self.rejected, exc)

    async def _report_progress(self) -> None:
        percent = 100 * self._asm.received // self._asm.count
        if self._on_progress is not None and self._reported + PROGRESS_STEP_PCT <= percent < 100:
            self._reported = percent - percent % PROGRESS_STEP_PCT
            await self._on_progress(self._reported)

    async def run(self, started: Callable[[], Awaitable[None]]) -> bytes:
        """Subscribe, call ``started`` (to report it), collect; unsubscribe in any case."""
        subscribed = [
            topics.artifact_topic(self._digest, "chunks"),
            topics.repair_topic(self._digest, "repairs", self._device_id),
        ]
        # Retained chunks are stale at best and planted at worst: live ones only.
        for topic in subscribed:
            self._link.subscribe(topic, self._on_chunk, retained=False)
        try:
            await started()
            async with asyncio.timeout(MAX_DOWNLOAD_S):
                return await self._collect()
        except TimeoutError:
            raise VerificationError(
                f"gave up on artifact after {MAX_DOWNLOAD_S:.0f}s: "
                f"{len(self._asm.missing)} chunks missing"
            ) from None
        finally:
            for topic in subscribed:
                self._link.unsubscribe(topic)

    async def _collect(self) -> bytes:
        """Wait for chunks; when they stop coming, ask for the missing ones.

        Only requests the broker accepted count as repair rounds: a broker
        outage delays the download but does not fail it.
        """
        asm, rounds, wait = self._asm, 0, self._timeout_s
        while rounds < self._repair_rounds:
            while not asm.complete:
                self._progress.clear()
                try:
                    await asyncio.wait_for(self._progress.wait(), wait)
                except TimeoutError:
                    break
                wait = self._timeout_s  # chunks are coming: ask again soon when they stop
            if asm.complete:
                return asm.data()
            await self._link.connected.wait()
            try:
                await self._link.publish(
                    topics.repair_topic(self._digest, "requests", self._device_id),
                    chunk_request(self._device_id, self._digest, asm.missing),
                )
            except MqttError as exc:  # lost the broker again: not a failed round
                logger.info("cannot ask for missing chunks yet: %s", exc)
                continue
            rounds += 1
            # Unanswered: the control plane may still be reconnecting (after a broker
            # restart both sides come back with jittered delays); wait longer each time.
            # NOTE: the wait goes back to one spell as soon as chunks come again. Keeping
            # the longer one (so that a device queued behind its own slow loop asks less)
            # made 300 simulated devices on 2 cores slower (50.8 s vs 24.7-33.5 s): a
            # device that really lacked chunks waited up to 24 s between asks. What the
            # control plane resends is bounded by the artifact's budget instead.
            wait = min(wait * 2, self._timeout_s * MAX_BACKOFF)
        raise VerificationError(f"gave up on artifact: {len(asm.missing)} chunks missing")
