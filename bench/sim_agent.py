"""A lightweight simulated device: the agent's protocol without its model runtime.

Each simulated agent has its own real MQTT connection (with the agent's last
will), verifies every command's signature and sequence (`common.messages`),
verifies the package's signature, downloads the artifact from the chunk
broadcast with the agent's own `edge.chunk_download.ChunkDownload` (each chunk
against the signed chunk list, targeted repair), checks the artifact digest
and splits it into the signed files, and reports each step through a real
on-disk outbox (`edge.outbox.Outbox`, one SQLite file per device). What it does
not do: write the model to A/B slots, open an ONNX Runtime session or serve
requests; its ``activated`` event says ``simulated: true``.

Used by `python -m bench.simulate` and `python -m bench.rollout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import keyring, messages, topics
from common.errors import FoglineError
from common.hardware import Hardware, check_package_fits
from common.manifest import SignedManifest, artifact_digest, split_artifact
from common.messages import Command
from common.mqtt import MqttLink, Will
from common.signing import TrustStore
from edge.chunk_download import ChunkDownload
from edge.outbox import Outbox

logger = logging.getLogger(__name__)


@dataclass
class SimStats:
    """What one simulated device did, for the benchmark's accounting."""

    commands: int = 0
    refused: int = 0
    activated: dict[str, float] = field(default_factory=dict)  # artifact digest -> when
    failed: int = 0
    chunks_rejected: int = 0
    bytes_received: int = 0


class SimAgent:
    """``async with SimAgent(...)``: online, heartbeating, obeying signed deploy commands."""

    def __init__(
        self,
        device_id: str,
        *,
        host: str,
        port: int,
        trust: TrustStore,
        state_dir: Path,
        heartbeat_s: float = 10.0,
        chunk_timeout_s: float = 3.0,
        username: str | None = None,
        password: str | None = None,
        keep_artifact: bool = True,
        hardware: Hardware | None = None,
        runtimes: tuple[str, ...] = (),
    ) -> None:
        """``hardware`` and ``runtimes``: what this simulated device has (and reports); it
        refuses a package that does not fit them as the agent does (common.hardware)."""
        self.device_id = device_id
        self.hardware = hardware or Hardware(arch="sim")
        self.runtimes = runtimes
        # False: every chunk is checked against the signed chunk list, but no bytes are
        # kept, so no whole-artifact digest either (hundreds of devices on one host).
        self.keep_artifact = keep_artifact
        self.trust = trust
        self.heartbeat_s = heartbeat_s
        self.chunk_timeout_s = chunk_timeout_s
        self.stats = SimStats()
        self.guard = messages.CommandGuard()
        self.link = MqttLink(
            client_id=f"fogline-agent-{device_id}",
            host=host,
            port=port,
            username=username,
            password=password,
            will=Will(self._topic("status"), messages.status(device_id, online=False)),
            persistent_session=True,
        )
        state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(state_dir / f"{device_id}.outbox.sqlite", self.link)
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: dict[str, str] = {}  # model -> version

    def _topic(self, kind: str) -> str:
        return topics.device_topic(self.device_id, kind)

    async def __aenter__(self) -> SimAgent:
        self.link.subscribe(self._topic("commands"), self._on_command)
        self.link.on_connected(self.publish_status)
        await self.link.__aenter__()
        await self.outbox.__aenter__()
        self._spawn(self._heartbeat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.outbox.__aexit__(*exc)
        await self.link.__aexit__(*exc)

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish_status(self) -> None:
        models = [{"name": n, "version": v} for n, v in self._active.items()]
        status = messages.status(
            self.device_id,
            True,
            agent_version="sim",
            hardware=self.hardware.to_dict(),
            runtimes=list(self.runtimes),
            models=models,
            keyring_version=self.trust.version,
        )
        with contextlib.suppress(FoglineError):
            await self.link.publish(self._topic("status"), status, retain=True)

    async def _heartbeat(self) -> None:
        """Telemetry as the agent sends it (router counters), jittered so a fleet that
        started together does not report in lockstep."""
        await asyncio.sleep(random.uniform(0, self.heartbeat_s))
        while True:
            doc = {"device_id": self.device_id, "router": {"requests": 0, "escalated": {}}}
            await self.outbox.put(self._topic("telemetry"), json.dumps(doc).encode(), qos=0)
            await asyncio.sleep(self.heartbeat_s)

    async def _emit(self, command_id: str | None, stage: str, **fields: object) -> None:
        event = messages.event(self.device_id, command_id, stage, **fields)
        await self.outbox.put(self._topic("events"), event)

    async def _on_command(self, _topic: str, payload: bytes) -> None:
        try:
            if _claims_trust(payload):
                await self._apply_trust(payload)
                return
            cmd = messages.parse_command(payload, self.trust, self.device_id)
            self.guard.accept(cmd)
        except FoglineError as exc:
            self.stats.refused += 1
            logger.info("%s refused a command: %s", self.device_id, exc)
            await self._emit(None, messages.REJECTED, error=f"{type(exc).__name__}")
            return
        self.stats.commands += 1
        self._spawn(self._run(cmd))

    async def _apply_trust(self, payload: bytes) -> None:
        """A signed keyring, verified as the agent does (kept in memory only)."""
        cmd, trust, _applied = keyring.verify_trust_command(payload, self.trust, self.device_id)
        self.guard.check_fresh(cmd)
        self.trust.adopt(trust)
        await self._emit(cmd.id, messages.TRUSTED, keyring_version=trust.version)
        await self.publish_status()

    async def _run(self, cmd: Command) -> None:
        try:
            if cmd.type != "deploy":
                raise FoglineError(f"the simulator does not run {cmd.type!r} commands")
            await self._deploy(cmd)
        except Exception as exc:  # NOTE: as the agent: report any failure, never crash
            self.stats.failed += 1
            await self._emit(cmd.id, messages.FAILED, error=f"{type(exc).__name__}: {exc}")

    async def _deploy(self, cmd: Command) -> None:
        signed = SignedManifest.from_dict(cmd.body["package"])
        digest = str(cmd.body["artifact"]["digest"])
        m = signed.manifest
        await self._emit(cmd.id, "received", model=m.name, version=m.version)
        signed.verify(self.trust)
        check_package_fits(m, self.hardware, self.runtimes)
        if m.chunks is None:
            raise FoglineError("the simulator needs a signed chunk list")
        download = ChunkDownload(
            self.link,
            self.device_id,
            digest,
            m.artifact_size,
            m.chunks.size,
            m.chunks.sha256,
            chunk_timeout_s=self.chunk_timeout_s,
            on_rejected=self._rejected(cmd.id),
            keep=self.keep_artifact,
        )
        data = await download.run(lambda: self._emit(cmd.id, "downloading", chunks=download.chunks))
        self.stats.bytes_received += m.artifact_size
        if self.keep_artifact:
            if await asyncio.to_thread(artifact_digest, data) != digest:
                raise FoglineError(f"artifact digest mismatch for {digest[:12]}")
            await asyncio.to_thread(split_artifact, data, m)  # every file against its digest
        await self._emit(cmd.id, "verified")
        self._active[m.name] = m.version
        self.stats.activated[digest] = time.time()  # wall clock: compared across processes
        await self._emit(
            cmd.id, "activated", model=m.name, version=m.version, format=m.format, simulated=True
        )
        await self.publish_status()

    def _rejected(self, command_id: str):  # type: ignore[no-untyped-def]
        async def report(error: str) -> None:
            self.stats.chunks_rejected += 1
            await self._emit(command_id, messages.CHUNK_REJECTED, error=error)

        return report


def _claims_trust(payload: bytes) -> bool:
    """Whether an (unverified) command says it is a ``trust`` command: picks the check."""
    try:
        return json.loads(payload)["command"]["type"] == messages.TRUST
    except (ValueError, KeyError, TypeError):
        return False
