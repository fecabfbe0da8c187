"""A real control plane (in-process aiohttp on loopback) and real agents for edge tests.

Plain helper module: ``from tests.edge.agent_harness import ControlPlane, agent_config``.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from cloud.control_server import REGISTRY, ROLLOUTS, ControlSettings, build_control_app
from cloud.key_rollout import KeyService
from cloud.keys_api import KEYS
from cloud.operator_tokens import ROLES
from cloud.registry import Registry
from cloud.rollout import RolloutController
from cloud.staged_api import STAGED
from cloud.staged_rollout import StagedRollouts
from common import topics
from common.messages import Command, sign_command
from common.signing import Signer
from edge.config import AgentConfig
from tests.conftest import free_port
from tests.model_fixtures import make_package

FINAL_STAGES = ("activated", "failed", "rejected", "removed", "policy_set")


class ControlPlane:
    """``async with ControlPlane(tmp, broker) as cp``: the real app on a free port."""

    def __init__(
        self,
        workdir: Path,
        broker: Any,
        *,
        chunk_size: int = 1024,
        database: str | None = None,
        **settings: Any,
    ) -> None:
        self.settings = ControlSettings(
            workdir=workdir,
            port=free_port(),
            broker_host=broker.host,
            broker_port=broker.port,
            chunk_size=chunk_size,
            database=database,
            **settings,
        )
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self._runner: web.AppRunner | None = None
        self.tokens: dict[str, str] = {}  # role -> an operator token with that role

    async def __aenter__(self) -> ControlPlane:
        self.app = build_control_app(self.settings)
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.settings.port).start()
        await self.rollouts.link.wait_connected(10)
        for role in ROLES:
            name = f"test-{role}"
            if not any(t["name"] == name for t in self.registry.operators.list()):
                self.tokens[role] = self.registry.operators.create(name, role)
        return self

    def auth(self, role: str = "admin") -> dict[str, str]:
        """The Authorization header of this plane's token for ``role``."""
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def registry(self) -> Registry:
        return self.app[REGISTRY]

    @property
    def rollouts(self) -> RolloutController:
        return self.app[ROLLOUTS]

    @property
    def staged(self) -> StagedRollouts:
        return self.app[STAGED]

    @property
    def keys(self) -> KeyService:
        return self.app[KEYS]

    @property
    def signer(self) -> Signer:
        return self.app[KEYS].signer

    def publish_toy(
        self, tmp: Path, version: str, *, seed: int = 0, name: str = "toy", **package: Any
    ):
        pkg = make_package(
            tmp / f"pkg-{name}-{version}",
            name=name,
            version=version,
            release=int(version),
            seed=seed,
            **package,
        )
        return self.registry.publish(pkg.directory, pkg.manifest, self.signer)

    async def wait_online(self, devices: list[str], timeout: float = 15) -> None:
        async with asyncio.timeout(timeout):
            while True:
                online = {
                    d["device_id"] for d in self.registry.devices() if d.get("state") == "online"
                }
                if set(devices) <= online:
                    return
                await asyncio.sleep(0.05)

    async def roll_out(
        self, name: str, version: str, devices: list[str], timeout: float = 30
    ) -> dict[str, Any]:
        rollout_id = await self.rollouts.start(name, version, devices)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.registry.rollout(rollout_id)
            if state["state"] != "running":
                return state
            await asyncio.sleep(0.05)
        return self.registry.rollout(rollout_id)

    async def wait_event(
        self, device_id: str, stage: str, timeout: float = 15, command_id: str | None = None
    ) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                for ev in self.registry.events(device_id, limit=500):
                    if ev.get("stage") == stage and command_id in (None, ev.get("command_id")):
                        return ev
                await asyncio.sleep(0.05)

    async def send_command(self, device_id: str, body: dict, kind: str = "deploy") -> str:
        """Sign and send one command by hand (no rollout); return its id."""
        seq = self.registry.next_seq(device_id)
        cmd = Command(kind, device_id, seq, time.time() + 60, body)
        await self.rollouts.link.publish(
            topics.device_topic(device_id, "commands"), sign_command(cmd, self.signer)
        )
        return cmd.id

    async def final_event(self, device_id: str, command_id: str, timeout: float = 20) -> dict:
        """The command's last event (``FINAL_STAGES``), when it comes."""
        async with asyncio.timeout(timeout):
            while True:
                for ev in self.registry.events(device_id, limit=500):
                    if ev.get("command_id") == command_id and ev["stage"] in FINAL_STAGES:
                        return ev
                await asyncio.sleep(0.05)


def agent_config(
    tmp: Path,
    device_id: str,
    broker: Any,
    trusted_key: str,
    *,
    model: str = "toy",
    cloud_url: str | None = None,
    **extra: Any,
) -> AgentConfig:
    return AgentConfig.from_dict(
        {
            "device_id": device_id,
            "state_dir": str(tmp / device_id),
            "trusted_keys": [trusted_key],
            "model": model,
            "broker_host": broker.host,
            "broker_port": broker.port,
            "api_port": free_port(),
            "cloud_url": cloud_url,
            "chunk_timeout_s": 0.3,
            "telemetry_interval_s": 1.0,
            **extra,
        }
    )


def share_store(first: Path, second: Path) -> None:
    """A replica shares the signing key and the artifact store (a shared volume)."""
    second.mkdir(parents=True)
    shutil.copytree(first / "keys", second / "keys")
    (second / "store").symlink_to(first / "store")
