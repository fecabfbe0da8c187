"""Helpers for staged-rollout tests: agents under steady traffic, and API calls.

Plain helper module: ``from tests.edge.staged_harness import Traffic, api, wait_finished``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from edge.agent import EdgeAgent
from tests.edge.agent_harness import ControlPlane
from tests.model_fixtures import v2_infer_body


class Traffic:
    """``async with Traffic(agents)``: each agent gets an inference every ``every_s``.

    The routing is the model's own (no forced route), so the telemetry shows what the
    version does: escalations, errors, local latency.
    """

    def __init__(self, agents: list[EdgeAgent], every_s: float = 0.05) -> None:
        self.agents = agents
        self.every_s = every_s
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        body = v2_infer_body(1)
        async with aiohttp.ClientSession() as s:
            while True:
                for agent in self.agents:
                    url = f"{agent.config.api_url}/v2/models/{agent.config.model}/infer"
                    with contextlib.suppress(aiohttp.ClientError):
                        async with s.post(url, json=body) as resp:
                            await resp.read()
                            self.sent += 1
                await asyncio.sleep(self.every_s)


async def api(
    cp: ControlPlane, method: str, path: str, body: Any = None, role: str = "operator"
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, cp.url + path, json=body, headers=cp.auth(role)) as resp,
    ):
        return resp.status, await resp.json()


async def wait_for(cp: ControlPlane, rollout_id: str, check: Any, timeout: float = 60) -> dict:
    """The rollout's view, once ``check(view)`` holds."""
    async with asyncio.timeout(timeout):
        while True:
            view = await cp.staged.view(rollout_id)
            if check(view):
                return view
            await asyncio.sleep(0.1)


async def wait_finished(cp: ControlPlane, rollout_id: str, timeout: float = 60) -> dict:
    return await wait_for(cp, rollout_id, lambda v: v["finished"], timeout)


async def served_version(agent: EdgeAgent) -> str | None:
    body = v2_infer_body(1, **{"fogline.route": "local"})
    url = f"{agent.config.api_url}/v2/models/{agent.config.model}/infer"
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as resp:
        doc = await resp.json()
    return (doc.get("parameters") or {}).get("fogline.model_version")


async def wait_baseline(cp: ControlPlane, model: str, version: str, devices: list[str]) -> None:
    """Until every device has reported traffic on ``version`` (the gates' baseline)."""
    async with asyncio.timeout(30):
        while True:
            ready = [
                cp.registry.staged.version_figures(model, version, [d])["requests"] > 0
                for d in devices
            ]
            if all(ready):
                return
            await asyncio.sleep(0.2)
