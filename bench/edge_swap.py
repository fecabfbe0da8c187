"""Failed requests while a new version is rolled out to a loaded agent and rolled back.

The real deploy path: a broker from ``fogline.broker.start_broker``, the
control plane's app in this process, a ``fogline edge run`` process. Clients
keep sending requests (each one at a time) while version 2 is rolled out and
a signed ``rollback`` command returns the agent to version 1; every answer
that is not a 200 from the edge, and every connection error, is a failure.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from cloud.control_server import REGISTRY, ROLLOUTS, ControlSettings, build_control_app
from cloud.keys_api import KEYS
from common import topics
from common.manifest import Manifest
from common.messages import Command, sign_command
from fogline.broker import free_port, start_broker
from fogline.processes import ManagedProcess

DEVICE = "bench-swap"


async def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise TimeoutError(f"hot swap: {what} not within {timeout}s")


async def _load(url: str, body: dict[str, Any], stop: asyncio.Event, tally: Counter[str]) -> None:
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            try:
                async with http.post(url, json=body) as resp:
                    doc = await resp.json(content_type=None)
                    params = doc.get("parameters") or {}
                    if resp.status == 200 and params.get("fogline.served_by") == "edge":
                        tally[f"v{params.get('fogline.model_version')}"] += 1
                    else:
                        tally["failed"] += 1
            except (aiohttp.ClientError, ValueError):
                tally["failed"] += 1


async def _swap(
    workdir: Path,
    packages: dict[str, tuple[Path, Manifest]],
    body: dict,
    clients: int,
    settle_s: float,
) -> dict[str, Any]:
    broker = start_broker(workdir=workdir / "broker")
    settings = ControlSettings(
        workdir=workdir / "control",
        port=free_port(),
        broker_host=broker.host,
        broker_port=broker.port,
    )
    app = build_control_app(settings)
    runner = web.AppRunner(app, access_log=None)
    agent: ManagedProcess | None = None
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", settings.port).start()
        await app[ROLLOUTS].link.wait_connected(10)
        registry, signer = app[REGISTRY], app[KEYS].signer
        for directory, manifest in packages.values():
            registry.publish(directory, manifest, signer)
        api_port = free_port()
        config = workdir / "swap-agent.json"
        config.write_text(
            json.dumps(
                {
                    "device_id": DEVICE,
                    "state_dir": str(workdir / "swap-agent"),
                    "trusted_keys": [signer.public_key_hex],
                    "model": next(iter(packages.values()))[1].name,
                    "broker_host": broker.host,
                    "broker_port": broker.port,
                    "api_port": api_port,
                }
            )
        )
        agent = ManagedProcess(
            "agent", ["edge", "run", "--config", str(config)], workdir / "swap.log"
        )
        await asyncio.to_thread(agent.wait_ready, f"http://127.0.0.1:{api_port}/v2/health/live", 60)
        await _wait(
            lambda: any(
                d["device_id"] == DEVICE and d.get("state") == "online" for d in registry.devices()
            ),
            30,
            "agent online",
        )

        async def roll_out(version: str) -> None:
            rid = await app[ROLLOUTS].start(manifest.name, version, [DEVICE])
            state = await _wait(
                lambda: (r := registry.rollout(rid))["state"] != "running" and r, 120, "rollout"
            )
            if state["state"] != "succeeded":
                raise RuntimeError(f"hot swap: rollout of {version} ended {state}")

        manifest = next(iter(packages.values()))[1]
        first, second = list(packages)
        await roll_out(first)
        url = f"http://127.0.0.1:{api_port}/v2/models/{manifest.name}/infer"
        stop, tally = asyncio.Event(), Counter[str]()
        load = [asyncio.create_task(_load(url, body, stop, tally)) for _ in range(clients)]
        try:
            await asyncio.sleep(settle_s)
            await roll_out(second)
            await asyncio.sleep(settle_s)
            cmd = Command("rollback", DEVICE, registry.next_seq(DEVICE), time.time() + 60, {})
            await app[ROLLOUTS].link.publish(
                topics.device_topic(DEVICE, "commands"), sign_command(cmd, signer)
            )
            done = await _wait(
                lambda: next(
                    (
                        e
                        for e in registry.events(DEVICE, limit=500)
                        if e.get("command_id") == cmd.id
                        and e["stage"] in ("activated", "failed", "rejected")
                    ),
                    None,
                ),
                60,
                "rollback",
            )
            if (done["stage"], done.get("version")) != ("activated", first):
                raise RuntimeError(f"hot swap: rollback ended {done}")
            await asyncio.sleep(settle_s)
        finally:
            stop.set()
            await asyncio.gather(*load)
    finally:
        if agent is not None:
            agent.stop()
        await runner.cleanup()
        broker.stop()
    return {
        "hot_swap_failed_requests": tally["failed"],
        "hot_swap_requests": sum(tally.values()),
        "hot_swap_served_by_version": {k: v for k, v in sorted(tally.items()) if k != "failed"},
        "hot_swap_clients": clients,
    }


def hot_swap(
    workdir: Path,
    packages: dict[str, tuple[Path, Manifest]],
    body: dict[str, Any],
    *,
    clients: int = 4,
    settle_s: float = 1.0,
) -> dict[str, Any]:
    """``packages``: version -> (package dir, unsigned manifest), the first served first."""
    return asyncio.run(_swap(workdir, packages, body, clients, settle_s))
