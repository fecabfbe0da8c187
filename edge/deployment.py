"""Model commands, one at a time: deploy, rollback, remove and set-policy.

A deploy downloads, verifies, stages, loads, self-tests and activates a package
in the A/B slots of its model's own store (``edge.model_library``); models are
independent, so a deploy or a failure of one never touches another.

Every step is reported on the device's events topic (through the outbox), and
any failure leaves the previous model serving.

MQTT chunks are checked one by one against the signed manifest's chunk list,
so a forged copy (live or retained) never takes a real chunk's place. If the
MQTT transfer still ends in a verification failure -- chunks missing, or, for a
package signed before chunk lists, an artifact that does not match its
digest -- the agent fetches the artifact over HTTP when the command names a URL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from common import chunking, golden
from common.artifact_http import fetch_artifact
from common.errors import FoglineError, InvalidInputError, VerificationError
from common.manifest import Manifest, SignedManifest, artifact_digest, split_artifact
from common.messages import CHUNK_REJECTED, DEPLOY, FAILED, ROLLBACK, Command, event
from common.mqtt import MqttLink
from common.names import check_name
from common.runtime import LocalRuntime
from edge.chunk_download import MAX_REPAIR_ROUNDS, ChunkDownload
from edge.local_runtime import open_runtime
from edge.model_library import ModelLibrary
from edge.model_store import SlotModel

logger = logging.getLogger(__name__)

Emit = Callable[[bytes], Awaitable[None]]
Activate = Callable[[SlotModel, LocalRuntime], Awaitable[None]]
Handler = Callable[[Command], Awaitable[None]]


class Deployer:
    """Runs one command at a time for one device."""

    def __init__(
        self,
        *,
        device_id: str,
        link: MqttLink,
        library: ModelLibrary,
        emit: Emit,
        on_activate: Activate,
        default_model: str,
        check_budget: Callable[[Manifest], None] = lambda m: None,
        check_target: Callable[[Manifest], None] = lambda m: None,
        handlers: dict[str, Handler] | None = None,
        chunk_timeout_s: float = 3.0,
        repair_rounds: int = MAX_REPAIR_ROUNDS,
        intra_op_threads: int = 1,
        transport: str = "mqtt",
        token: str | None = None,
    ) -> None:
        """``handlers``: the other command types (remove, set-policy) by type; they run
        under the same lock and have their failures reported the same way."""
        self.device_id = device_id
        self._link = link
        self._library = library
        self._default_model = default_model
        self._check_budget = check_budget
        self._check_target = check_target  # does this device's hardware run the package?
        self._handlers = handlers or {}
        self._emit_raw = emit
        self._on_activate = on_activate
        self._chunk_timeout_s = chunk_timeout_s
        self._repair_rounds = repair_rounds
        self._threads = intra_op_threads
        self._transport = transport  # "mqtt" (HTTP only as a fallback) or "http"
        self._token = token  # the device's token: the artifact route asks for it
        self._downloads = library.state_dir / "downloads"
        self._lock = asyncio.Lock()

    async def _emit(self, cmd: Command, stage: str, **fields: Any) -> None:
        await self._emit_raw(event(self.device_id, cmd.id, stage, **fields))

    async def run(self, cmd: Command) -> None:
        """Execute a verified command; report failure as an event, never raise."""
        async with self._lock:
            try:
                if cmd.type == DEPLOY:
                    await self._deploy(cmd)
                elif cmd.type == ROLLBACK:
                    await self._rollback(cmd)
                elif cmd.type in self._handlers:
                    await self._handlers[cmd.type](cmd)
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
            digest = str(artifact["digest"])
            http_url = artifact.get("http_url")
            # The signed chunk size wins; the command's is for packages without a list.
            legacy_size = int(artifact.get("chunk_size") or chunking.DEFAULT_CHUNK_SIZE)
            if not chunking.MIN_CHUNK_SIZE <= legacy_size <= chunking.MAX_CHUNK_SIZE:
                raise ValueError(f"chunk size {legacy_size}")
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"deploy command body: {exc}") from exc
        m = signed.manifest
        await self._emit(cmd, "received", model=m.name, version=m.version)
        signed.verify(self._library.trust)  # before a single byte is downloaded
        self._check_target(m)  # an engine for another GPU: refused, the old model serves on
        self._check_budget(m)  # memory and disk budgets: before anything is written
        store = self._library.store(m.name)
        store.check_release(signed, allow_downgrade=bool(cmd.body.get("allow_downgrade")))
        store.check_space(m.artifact_size)
        started = time.monotonic()
        target = _Target(digest, signed, m.chunks.size if m.chunks else legacy_size)
        files = await self._fetch(cmd, target, http_url)
        await self._emit(cmd, "downloaded", seconds=round(time.monotonic() - started, 3))
        await self._emit(cmd, "verified")
        staged = await asyncio.to_thread(store.stage, signed, files)
        await self._emit(cmd, "staged", slot=staged.slot)
        await self._load_and_activate(cmd, staged)

    async def _load_and_activate(self, cmd: Command, staged: SlotModel) -> None:
        runtime = open_runtime(
            staged.model_file, staged.signed.manifest, intra_op_threads=self._threads
        )
        await runtime.load()
        await self._emit(cmd, "loaded")
        await self_test(runtime, staged)
        await self._emit(cmd, "self_tested")
        store = self._library.store(staged.signed.manifest.name)
        await asyncio.to_thread(store.activate, staged)
        await self._on_activate(staged, runtime)
        m = staged.signed.manifest
        await self._emit(cmd, "activated", model=m.name, version=m.version, slot=staged.slot)

    async def _rollback(self, cmd: Command) -> None:
        """Back to the previous slot, through the same load / self-test / switch path."""
        name = self.model_of(cmd)
        previous = await asyncio.to_thread(self._library.store(name).previous)
        await self._load_and_activate(cmd, previous)

    def model_of(self, cmd: Command) -> str:
        """The installed model a command names (``model``; the config's model if absent)."""
        name = check_name(cmd.body.get("model", self._default_model), "model name")
        if not self._library.has(name):
            raise InvalidInputError(f"model {name!r} is not installed on this device")
        return name

    async def _fetch(self, cmd: Command, target: _Target, http_url: str | None) -> dict[str, bytes]:
        """MQTT broadcast first (HTTP when configured); HTTP if MQTT fails verification.

        Returns the artifact's files, each checked against the signed manifest.
        """
        if http_url is None or self._transport == "mqtt":
            try:
                data = await self._download(cmd, target)
                return await asyncio.to_thread(target.verify, data)
            except VerificationError as exc:
                if http_url is None:
                    raise
                logger.warning("MQTT transfer failed (%s); falling back to HTTP", exc)
        await self._emit(cmd, "downloading", transport="http")
        self._downloads.mkdir(exist_ok=True)
        partial = self._downloads / f"{target.digest}.part"  # resumed by Range after a restart
        async with aiohttp.ClientSession() as session:
            data = await fetch_artifact(
                session,
                http_url,
                size=target.size,
                digest=target.digest,
                partial=partial,
                token=self._token,
            )
        partial.unlink(missing_ok=True)
        return await asyncio.to_thread(target.verify, data)

    async def _download(self, cmd: Command, target: _Target) -> bytes:
        """Collect chunks from the broadcast; ask for missing ones when it goes quiet."""
        m = target.signed.manifest
        download = ChunkDownload(
            self._link,
            self.device_id,
            target.digest,
            target.size,
            target.chunk_size,
            m.chunks.sha256 if m.chunks else None,
            chunk_timeout_s=self._chunk_timeout_s,
            repair_rounds=self._repair_rounds,
            on_rejected=lambda error: self._emit(cmd, CHUNK_REJECTED, error=error),
            # Operators see "downloading n%" (a staged rollout's per-device state).
            on_progress=lambda percent: self._emit(cmd, "downloading", progress=percent),
        )
        return await download.run(lambda: self._emit(cmd, "downloading", chunks=download.chunks))


@dataclass(frozen=True)
class _Target:
    """What a deploy must end up with: signed metadata, never a server's word."""

    digest: str
    signed: SignedManifest
    chunk_size: int

    @property
    def size(self) -> int:
        return self.signed.manifest.artifact_size

    def verify(self, data: bytes) -> dict[str, bytes]:
        """The artifact's files; VerificationError unless ``data`` is what was signed."""
        if artifact_digest(data) != self.digest:
            raise VerificationError(f"artifact digest mismatch for {self.digest[:12]}")
        return split_artifact(data, self.signed.manifest)


async def self_test(runtime: LocalRuntime, model: SlotModel) -> None:
    """Run the package's golden inputs and require its golden outputs."""
    await golden.self_test(runtime, model.path, model.signed.manifest)
