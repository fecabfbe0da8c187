"""The edge agent: one async context manager that owns every long-lived part.

MQTT link ─ commands ─> CommandGuard ─> Deployer ─> ModelLibrary (A/B slots per model)
    ^                                      │ on activate, remove, set-policy
    └─ outbox <─ events, telemetry         v
local V2 API ─> DataPlane ─> Router per model (ModelServing) ─> OnnxRuntime | TensorRtRuntime
                                                                  | CloudClient
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from aiohttp import web

from common import keyring, messages, topics
from common.errors import FoglineError
from common.fsutil import atomic_write
from common.hardware import Hardware, check_package_fits
from common.inference import InferRequest, InferResponse
from common.manifest import Manifest
from common.messages import Command
from common.mqtt import MqttLink, TlsConfig, Will
from common.request_body import RequestLimits
from common.runtime import LocalRuntime
from common.signing import TrustStore
from common.v2_server import DataPlane, build_v2_app
from edge.config import AgentConfig
from edge.deployment import Deployer
from edge.hard_examples import HardExampleStore
from edge.hard_examples import parse_settings as parse_hard_example_settings
from edge.hardware import ONNX_ONLY, probe_hardware, probe_runtimes
from edge.local_runtime import open_runtime
from edge.model_commands import ModelCommands
from edge.model_library import ModelLibrary
from edge.model_store import SlotModel
from edge.outbox import Outbox
from edge.router import Router
from edge.serving import ModelServing, merged_stats

logger = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"


class EdgeAgent:
    def __init__(self, config: AgentConfig) -> None:
        config.check_api_exposure()  # also for configs not built by from_dict: refuse at start
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self._keyring_file = config.state_dir / "keyring.json"
        self._keyrings: list[dict[str, Any]] = []  # applied on top of the anchors, in order
        self.trust = self._restore_trust()
        self.library = ModelLibrary(config.state_dir, self.trust)
        self._seq_file = config.state_dir / "seq.json"
        self._pending_dir = config.state_dir / "pending"  # accepted, unfinished commands
        self.guard = messages.CommandGuard(self._read_seq())
        self._accepted: deque[str] = deque(maxlen=256)  # ids of recently accepted commands
        self.link = MqttLink(
            client_id=f"fogline-agent-{config.device_id}",
            host=config.broker_host,
            port=config.broker_port,
            username=config.broker_username,
            password=config.broker_password,
            will=Will(self._topic("status"), messages.status(config.device_id, online=False)),
            persistent_session=True,  # commands sent while the device is offline wait for it
            tls=_broker_tls(config),
        )
        if config.cloud_url and not config.cloud_allowed:
            logger.warning(
                "local API is public without api_token: requests are served locally only, "
                "never escalated with this device's fallback token"
            )
        self.dataplane = DataPlane("fogline-edge", AGENT_VERSION)
        self.serving = ModelServing(config, self.dataplane, config.state_dir / "policies.json")
        self.hard_examples = _hard_example_store(config)
        if self.hard_examples is not None:
            self.serving.on_escalated = self._keep_hard_example
        self._stack = AsyncExitStack()
        self._tasks: set[asyncio.Task[None]] = set()
        self.outbox: Outbox | None = None
        self.deployer: Deployer | None = None
        self.hardware = Hardware()  # probed at start (edge.hardware)
        self.runtimes = ONNX_ONLY  # the runtimes this host serves with, probed at start
        self._stopping = False

    def _topic(self, kind: str) -> str:
        return topics.device_topic(self.config.device_id, kind)

    def _restore_trust(self) -> TrustStore:
        """Anchors from the config, then the enrollment keyring, then the keyrings applied
        since (kept in the state dir, re-verified from the anchors on every start)."""
        trust = self.config.initial_trust()
        try:
            chain = json.loads(self._keyring_file.read_text())["keyrings"]
            trust, self._keyrings = keyring.apply_chain(trust, chain, require_newer=False)
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, FoglineError) as exc:
            # The control plane sends the keyrings again when the status shows an old version.
            logger.error("ignoring %s: %s", self._keyring_file, exc)
        return trust

    def _read_seq(self) -> int:
        try:
            return int(json.loads(self._seq_file.read_text())["last_seq"])
        except FileNotFoundError:
            return 0

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> EdgeAgent:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    @property
    def router(self) -> Router:
        """The router of the config's model (served from the start)."""
        return self.serving.get(self.config.model).router

    @property
    def active(self) -> SlotModel | None:
        """The active slot of the config's model, None while it has no local model."""
        return self.serving.get(self.config.model).model

    async def _start(self) -> None:
        self.hardware = await asyncio.to_thread(probe_hardware)
        self.runtimes = await asyncio.to_thread(probe_runtimes)
        logger.info("hardware: %s; runtimes: %s", self.hardware.to_dict(), self.runtimes)
        await asyncio.to_thread(self.library.migrate_legacy, self.config.model)
        await asyncio.to_thread(self.library.sweep)
        self._stack.push_async_callback(self.serving.close)
        await self.serving.add(self.config.model)
        for name in await asyncio.to_thread(self.library.names):
            active = await asyncio.to_thread(self.library.store(name).load_active)
            if active is None:
                continue
            try:
                await self._activate(active, self._runtime_for(active))
            except Exception:
                # Serve (via the cloud) rather than crash-loop on a model this host can't load.
                logger.exception("cannot load model %s; serving it without a local one", name)
                await self.serving.add(name)
        await self._start_api()
        await self._stack.enter_async_context(self.link)
        self.outbox = await self._stack.enter_async_context(
            Outbox(self.config.state_dir / "outbox.sqlite", self.link)
        )
        self.deployer = Deployer(
            device_id=self.config.device_id,
            link=self.link,
            library=self.library,
            emit=self._emit_event,
            on_activate=self._activate,
            default_model=self.config.model,
            check_budget=self._check_budget,
            check_target=lambda m: check_package_fits(m, self.hardware, self.runtimes),
            handlers=ModelCommands(
                self.serving,
                self.library,
                device_id=self.config.device_id,
                main_model=self.config.model,
                emit=self._emit_event,
                changed=self._status_changed,
            ).handlers(),
            chunk_timeout_s=self.config.chunk_timeout_s,
            repair_rounds=self.config.repair_rounds,
            intra_op_threads=self.config.intra_op_threads,
            transport=self.config.artifact_transport,
            token=self.config.cloud_token,
        )
        self.link.on_connected(self.publish_status)
        await self._resume_pending()  # before new commands: they queue behind these
        self.link.subscribe(self._topic("commands"), self._on_command)
        self._spawn(self._telemetry_loop(), "telemetry")
        if self.hard_examples is not None:
            assert self.config.control_url and self.config.cloud_token
            interval = float(self.config.hard_examples.get("upload_interval_s", 30.0))
            upload = self.hard_examples.run(
                self.config.control_url, self.config.cloud_token, interval
            )
            self._spawn(upload, "hard-examples")
            self._stack.callback(self.hard_examples.close)
        self._stack.push_async_callback(self._cancel_tasks)
        logger.info("agent %s serving V2 API on %s", self.config.device_id, self.config.api_url)

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True  # NOTE: from here no "online" status may follow the "offline"
        if self.link.connected.is_set():
            try:  # a clean exit says offline itself; a crash leaves it to the will
                await asyncio.wait_for(
                    self.link.publish(self._topic("status"), self._status(False), retain=True),
                    timeout=2.0,  # never hold up a shutdown for a broker that is gone
                )
            except (FoglineError, TimeoutError) as err:
                logger.debug("could not publish offline status: %s", err)
        await self._stack.aclose()

    async def _start_api(self) -> None:
        cfg = self.config
        app = build_v2_app(
            self.dataplane,
            auth_tokens={cfg.api_token} if cfg.api_token else None,
            max_inflight=cfg.max_inflight,
            limits=RequestLimits(
                max_body=cfg.max_body_bytes,
                body_timeout_s=cfg.body_timeout_s,
                decode_budget=2 * cfg.max_body_bytes,
            ),
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, self.config.api_host, self.config.api_port)
        await site.start()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("agent task %s failed", task.get_name(), exc_info=task.exception())

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- models -------------------------------------------------------------------

    def _runtime_for(self, model: SlotModel) -> LocalRuntime:
        runtime = open_runtime(
            model.model_file, model.signed.manifest, intra_op_threads=self.config.intra_op_threads
        )
        runtime.metrics = self.dataplane.metrics  # executions, on the agent's /metrics
        return runtime

    async def _activate(self, model: SlotModel, runtime: LocalRuntime) -> None:
        await runtime.load()
        await self.serving.activate(model, runtime)
        await self._status_changed()

    async def _status_changed(self) -> None:
        if self.link.connected.is_set():
            await self.publish_status()

    def _check_budget(self, manifest: Manifest) -> None:
        self.serving.check_memory(manifest, self.config.memory_budget_bytes)
        self.library.check_disk(manifest, self.config.disk_budget_bytes)

    # -- MQTT ---------------------------------------------------------------------

    async def _emit_event(self, payload: bytes) -> None:
        assert self.outbox is not None
        await self.outbox.put(self._topic("events"), payload)

    async def _on_command(self, _topic: str, payload: bytes) -> None:
        try:
            if _command_type(payload) == messages.TRUST:
                await self._apply_trust(payload)
                return
            cmd = messages.parse_command(payload, self.trust, self.config.device_id)
        except FoglineError as exc:
            # NOTE: nothing from an unverified payload goes into the event (not its id,
            # not its key id): anyone can publish here, and the event is attributed to us.
            logger.warning("refused unverified command: %s", exc)
            await self._reject(None, f"{type(exc).__name__}: command not verified")
            return
        try:
            self.guard.accept(cmd)
            # NOTE: pending before seq: a crash between the two resumes the command (and a
            # redelivery runs it once more, harmlessly); the other order could lose it.
            await asyncio.to_thread(atomic_write, self._pending_path(cmd.seq), payload)
            await asyncio.to_thread(
                atomic_write, self._seq_file, json.dumps({"last_seq": cmd.seq}).encode()
            )
        except FoglineError as exc:
            logger.warning("refused command: %s", exc)
            # Signed, so its id is the control plane's; but a replay of one we accepted
            # must not report that command (perhaps still running) as rejected.
            await self._reject(None if cmd.id in self._accepted else cmd.id, str(exc))
            return
        self._accepted.append(cmd.id)
        self._spawn(self._run(cmd), f"command-{cmd.id}")

    def _pending_path(self, seq: int) -> Path:
        """``pending/{seq}.json``: named by the signed integer seq, never by a string."""
        return self._pending_dir / f"{int(seq):020d}.json"

    async def _run(self, cmd: Command) -> None:
        """Run a command; forget it once it ended (a cancellation or a crash keeps it)."""
        assert self.deployer is not None
        await self.deployer.run(cmd)  # reports failures itself; raises only when cancelled
        await asyncio.to_thread(self._pending_path(cmd.seq).unlink, missing_ok=True)

    async def _resume_pending(self) -> None:
        """Run again the commands accepted before a crash or stop that had not ended.

        The control plane sent each once and the agent acknowledged it at the broker,
        so nobody else will: a SIGKILL mid-download used to leave the rollout waiting
        for its timeout. Each is verified again (the state dir is not a signature);
        seq is not checked again: it was accepted, and persisted, when it came.
        """
        self._pending_dir.mkdir(exist_ok=True)
        for path in sorted(self._pending_dir.glob("*.json")):
            try:
                payload = await asyncio.to_thread(path.read_bytes)
                cmd = messages.parse_command(payload, self.trust, self.config.device_id)
                self.guard.check_fresh(cmd)
            except (OSError, FoglineError) as exc:
                logger.warning("dropped pending command %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            logger.info("resuming command %s (%s) after a restart", cmd.id, cmd.type)
            self._accepted.append(cmd.id)  # a redelivery is a replay, not a rejection
            self._spawn(self._run(cmd), f"command-{cmd.id}")

    async def _reject(self, command_id: str | None, error: str) -> None:
        await self._emit_event(
            messages.event(self.config.device_id, command_id, messages.REJECTED, error=error)
        )

    async def _apply_trust(self, payload: bytes) -> None:
        """A new keyring: checked (common.keyring), kept so a restart keeps it, then used
        by everything that verifies (commands, manifests: the same TrustStore object).

        Raises FoglineError while the command is unverified; once verified, a refusal is
        reported with its id. Trust commands skip ``seq``: keyring versions order them.
        """
        cmd, trust, applied = keyring.verify_trust_command(
            payload, self.trust, self.config.device_id
        )
        try:
            self.guard.check_fresh(cmd)
        except FoglineError as exc:
            logger.warning("refused trust command: %s", exc)
            await self._reject(cmd.id, str(exc))
            return
        chain = [*self._keyrings, *applied]
        data = json.dumps({"keyrings": chain}).encode()
        await asyncio.to_thread(atomic_write, self._keyring_file, data)
        self._keyrings = chain
        self.trust.adopt(trust)
        logger.info("keyring %d applied (%d keys)", trust.version, len(trust.keys))
        await self._emit_event(
            messages.event(
                self.config.device_id, cmd.id, messages.TRUSTED, keyring_version=trust.version
            )
        )
        await self._status_changed()

    def _status(self, online: bool) -> bytes:
        return messages.status(
            self.config.device_id,
            online,
            agent_version=AGENT_VERSION,
            hardware=self.hardware.to_dict(),
            runtimes=list(self.runtimes),
            models=self.serving.status(),
            api_url=self.config.api_url,
            keyring_version=self.trust.version,
            labels=self.config.labels,
        )

    async def publish_status(self) -> None:
        if self._stopping:  # e.g. an on-connect callback that ran after the offline status
            return
        await self.link.publish(self._topic("status"), self._status(True), retain=True)

    def _keep_hard_example(
        self, version: str, request: InferRequest, response: InferResponse, reason: str
    ) -> None:
        """Off the request's path: the store writes to disk in a worker thread."""
        assert self.hard_examples is not None
        task = asyncio.get_running_loop().run_in_executor(
            None, self.hard_examples.offer, version, request, response, reason
        )
        task.add_done_callback(lambda f: f.exception())  # offer logs its own failures

    async def _telemetry_loop(self) -> None:
        assert self.outbox is not None
        while True:
            await asyncio.sleep(self.config.telemetry_interval_s)
            per_model = self.serving.stats(reset=True)
            doc = {
                "device_id": self.config.device_id,
                "model": self.config.model,
                "router": merged_stats(per_model, self.config.model),
                "models": per_model,
            }
            await self.outbox.put(self._topic("telemetry"), json.dumps(doc).encode(), qos=0)


def _hard_example_store(config: AgentConfig) -> HardExampleStore | None:
    """The store of escalations to learn from, when there is somewhere to send them."""
    settings = parse_hard_example_settings(config.hard_examples)
    if not (config.control_url and config.cloud_token) or settings.get("sample_rate") == 0:
        return None
    return HardExampleStore(
        config.state_dir / "hard-examples.sqlite",
        sample_rate=settings.get("sample_rate", 1.0),
        max_rows=settings.get("max_rows", 2000),
    )


def _broker_tls(config: AgentConfig) -> TlsConfig | None:
    if not config.broker_tls_ca:
        return None
    return TlsConfig(config.broker_tls_ca, config.broker_tls_cert, config.broker_tls_key)


def _command_type(payload: bytes) -> str | None:
    """The claimed type, unverified: only picks which check the command goes through."""
    try:
        return str(json.loads(payload)["command"]["type"])
    except (ValueError, KeyError, TypeError):
        return None
