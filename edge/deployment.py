"""Deploy and rollback commands: download, verify, stage, load, self-test, activate.

Every step is reported on the device's events topic (through the outbox), and
any failure leaves the previous model serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from common import chunking, topics
from common.artifact_http import fetch_artifact
from common.chunking import Assembler
from common.errors import FoglineError, InvalidInputError, VerificationError
from common.golden import compare, load_golden
from common.manifest import SignedManifest, artifact_digest, split_artifact
from common.messages import CHUNK_REJECTED, FAILED, Command, chunk_request, event
from common.mqtt import MqttError, MqttLink
from common.onnx_runtime import OnnxRuntime
from edge.model_store import ModelStore, SlotModel

logger = logging.getLogger(__name__)

Emit = Callable[[bytes], Awaitable[None]]
Activate = Callable[[SlotModel, OnnxRuntime], Awaitable[None]]

MAX_REPAIR_ROUNDS = 10  # requests for missing chunks before giving up on MQTT
MAX_DOWNLOAD_S = 600.0  # however long a broker outage lasts, stop waiting after this


class Deployer:
    """Runs one command at a time for one device."""

    def __init__(
        self,
        *,
        device_id: str,
        link: MqttLink,
        store: ModelStore,
        emit: Emit,
        on_activate: Activate,
        chunk_timeout_s: float = 3.0,
        intra_op_threads: int = 1,
        transport: str = "mqtt",
        http_token: str | None = None,
    ) -> None:
        self.device_id = device_id
        self._link = link
        self._store = store
        self._emit_raw = emit
        self._on_activate = on_activate
        self._chunk_timeout_s = chunk_timeout_s
        self._threads = intra_op_threads
        self._transport = transport  # "mqtt" (HTTP only as a fallback) or "http"
        self._http_token = http_token  # the device token: the control plane asks for one
        self._downloads = store.root / "downloads"
        self._lock = asyncio.Lock()

    async def _emit(self, cmd: Command, stage: str, **fields: Any) -> None:
        await self._emit_raw(event(self.device_id, cmd.id, stage, **fields))

    async def run(self, cmd: Command) -> None:
        """Execute a verified command; report failure as an event, never raise."""
        async with self._lock:
            try:
                if cmd.type == "deploy":
                    await self._deploy(cmd)
                elif cmd.type == "rollback":
                    await self._rollback(cmd)
                else:
                    raise InvalidInputError(f"command type {cmd.type!r} is not supported yet")
            except Exception as exc:
                # NOTE: broad on purpose: whatever goes wrong (a model ONNX Runtime cannot
                # load included), the previous model keeps serving and the operator is told.
                expected = isinstance(exc, FoglineError | OSError | KeyError | ValueError)
                logger.warning(
                    "command %s (%s) failed: %s", cmd.id, cmd.type, exc, exc_info=not expected
                )
                await self._emit(cmd, FAILED, error=f"{type(exc).__name__}: {exc}")

    async def _deploy(self, cmd: Command) -> None:
        try:
            signed = SignedManifest.from_dict(cmd.body["package"])
            artifact = cmd.body["artifact"]
            digest, chunk_size = str(artifact["digest"]), int(artifact["chunk_size"])
            http_url = artifact.get("http_url")
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"deploy command body: {exc}") from exc
        m = signed.manifest
        await self._emit(cmd, "received", model=m.name, version=m.version)
        signed.verify(self._store.trust)  # before a single byte is downloaded
        self._store.check_release(signed, allow_downgrade=bool(cmd.body.get("allow_downgrade")))
        self._store.check_space(m.artifact_size)
        started = time.monotonic()
        data = await self._fetch(cmd, digest, m.artifact_size, chunk_size, http_url)
        await self._emit(cmd, "downloaded", seconds=round(time.monotonic() - started, 3))
        if artifact_digest(data) != digest:
            raise VerificationError(f"artifact digest mismatch for {digest[:12]}")
        files = split_artifact(data, m)
        await self._emit(cmd, "verified")
        staged = await asyncio.to_thread(self._store.stage, signed, files)
        await self._emit(cmd, "staged", slot=staged.slot)
        await self._load_and_activate(cmd, staged)

    async def _load_and_activate(self, cmd: Command, staged: SlotModel) -> None:
        runtime = OnnxRuntime(
            staged.model_file, staged.signed.manifest, intra_op_threads=self._threads
        )
        await runtime.load()
        await self._emit(cmd, "loaded")
        await self_test(runtime, staged)
        await self._emit(cmd, "self_tested")
        await asyncio.to_thread(self._store.activate, staged)
        await self._on_activate(staged, runtime)
        m = staged.signed.manifest
        await self._emit(cmd, "activated", model=m.name, version=m.version, slot=staged.slot)

    async def _rollback(self, cmd: Command) -> None:
        """Back to the previous slot, through the same load / self-test / switch path."""
        previous = await asyncio.to_thread(self._store.previous)
        await self._load_and_activate(cmd, previous)

    async def _fetch(
        self, cmd: Command, digest: str, total: int, chunk_size: int, http_url: str | None
    ) -> bytes:
        """MQTT broadcast first (HTTP when configured); HTTP if MQTT gives up."""
        if http_url is None or self._transport == "mqtt":
            try:
                return await self._download(cmd, digest, total, chunk_size)
            except VerificationError as exc:
                if http_url is None:
                    raise
                logger.warning("MQTT transfer failed (%s); falling back to HTTP", exc)
        await self._emit(cmd, "downloading", transport="http")
        self._downloads.mkdir(exist_ok=True)
        partial = self._downloads / f"{digest}.part"  # survives a restart: resumed by Range
        async with aiohttp.ClientSession() as session:
            data = await fetch_artifact(
                session,
                http_url,
                size=total,
                digest=digest,
                partial=partial,
                token=self._http_token,
            )
        partial.unlink(missing_ok=True)
        return data

    async def _download(self, cmd: Command, digest: str, total: int, chunk_size: int) -> bytes:
        """Collect chunks from the broadcast; ask for missing ones when it goes quiet."""
        asm = Assembler(total, chunk_size)
        progress = asyncio.Event()
        topic = topics.artifact_topic(digest, "chunks")

        async def on_chunk(_topic: str, payload: bytes) -> None:
            try:
                if asm.add(chunking.decode(payload)):
                    progress.set()
            except VerificationError as exc:
                await self._emit(cmd, CHUNK_REJECTED, error=str(exc))

        self._link.subscribe(topic, on_chunk)
        try:
            await self._emit(cmd, "downloading", chunks=asm.count)
            async with asyncio.timeout(MAX_DOWNLOAD_S):
                return await self._collect(asm, progress, digest)
        except TimeoutError:
            raise VerificationError(
                f"gave up on artifact after {MAX_DOWNLOAD_S:.0f}s: "
                f"{len(asm.missing)} chunks missing"
            ) from None
        finally:
            self._link.unsubscribe(topic)

    async def _collect(self, asm: Assembler, progress: asyncio.Event, digest: str) -> bytes:
        """Wait for chunks; when they stop coming, ask for the missing ones.

        Only requests the broker accepted count as repair rounds: a broker
        outage delays the download but does not fail it.
        """
        rounds = 0
        while rounds < MAX_REPAIR_ROUNDS:
            while not asm.complete:
                progress.clear()
                try:
                    await asyncio.wait_for(progress.wait(), self._chunk_timeout_s)
                except TimeoutError:
                    break
            if asm.complete:
                return asm.data()
            await self._link.connected.wait()
            try:
                await self._link.publish(
                    topics.artifact_topic(digest, "requests"),
                    chunk_request(self.device_id, digest, asm.missing),
                )
            except MqttError as exc:  # lost the broker again: not a failed round
                logger.info("cannot ask for missing chunks yet: %s", exc)
                continue
            rounds += 1
        raise VerificationError(f"gave up on artifact: {len(asm.missing)} chunks missing")


async def self_test(runtime: OnnxRuntime, model: SlotModel) -> None:
    """Run the package's golden inputs and require its golden outputs."""
    golden = model.path / model.signed.manifest.file("golden").name
    inputs, expected = await asyncio.to_thread(load_golden, golden)
    outputs = await asyncio.to_thread(runtime.infer_sync, inputs, list(expected))
    compare(expected, {t.name: t.data for t in outputs})
