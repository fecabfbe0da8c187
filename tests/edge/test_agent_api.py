"""The agent's local API: bearer token, no anonymous public bind, no anonymous cloud use.

Real agent processes (a staged model, a real Mosquitto) and a tiny real cloud
that records who called it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from common.errors import InvalidInputError
from common.inference import DEGRADED, ROUTE, SERVED_BY
from common.serving_metrics import parse
from edge.config import AgentConfig
from tests.model_fixtures import Package, make_package, v2_infer_body
from tests.server_processes import ROOT, ServerProcess, start_agent

BASE = {"device_id": "d", "state_dir": "/tmp/x", "trusted_keys": ["ab"], "model": "toy"}


@pytest.mark.parametrize(
    ("extra", "ok"),
    [
        ({}, True),
        ({"api_host": "127.0.0.1"}, True),
        ({"api_host": "::1"}, True),
        ({"api_host": "localhost"}, True),
        ({"api_host": "0.0.0.0"}, False),
        ({"api_host": ""}, False),
        ({"api_host": "::"}, False),
        ({"api_host": "10.1.2.3"}, False),
        ({"api_host": "device.example"}, False),
        ({"api_host": "0.0.0.0", "api_token": "t"}, True),
        ({"api_host": "0.0.0.0", "insecure_public": True}, True),
        ({"api_host": "0.0.0.0", "api_token": "  "}, False),
    ],
)
def test_public_bind_needs_a_token_or_insecure_public(extra: dict[str, Any], ok: bool) -> None:
    if ok:
        AgentConfig.from_dict({**BASE, **extra})
    else:
        with pytest.raises(InvalidInputError, match="api_token"):
            AgentConfig.from_dict({**BASE, **extra})


def test_cloud_is_never_spent_for_anonymous_network_callers() -> None:
    public = AgentConfig.from_dict({**BASE, "api_host": "0.0.0.0", "insecure_public": True})
    assert not public.cloud_allowed
    assert AgentConfig.from_dict({**BASE, "api_host": "0.0.0.0", "api_token": "t"}).cloud_allowed
    assert AgentConfig.from_dict(BASE).cloud_allowed  # loopback: callers on the device itself


def test_token_from_environment_stays_a_string() -> None:
    env = {"FOGLINE_AGENT_API_TOKEN": "12345", "FOGLINE_AGENT_API_PORT": "8081"}
    assert AgentConfig.env_overrides(env) == {"api_token": "12345", "api_port": 8081}


def test_cli_refuses_a_public_bind_without_token(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({**BASE, "state_dir": str(tmp_path), "api_host": "0.0.0.0"}))
    proc = subprocess.run(
        [sys.executable, "-m", "fogline", "edge", "run", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--insecure-public" in proc.stderr and "api_token" in proc.stderr


# --- real agents ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    return make_package(tmp_path_factory.mktemp("edge"), seed=0)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for agent in started:
        agent.stop()


class RecordingCloud:
    """A real V2 endpoint that only notes who called (and answers 503)."""

    def __init__(self) -> None:
        self.auth: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.auth.append(request.headers.get("Authorization"))
        return web.json_response({"error": "busy"}, status=503)


@pytest.fixture
async def recording_cloud() -> AsyncIterator[tuple[RecordingCloud, str]]:
    cloud = RecordingCloud()
    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", cloud.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield cloud, str(server.make_url("")).rstrip("/")
    await server.close()


async def post(url: str, body: dict[str, Any], token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_api_token_is_required(
    mosquitto: Any, package: Package, tmp_path: Path, agents: list[ServerProcess]
) -> None:
    agent = start_agent(package, tmp_path, mosquitto, api_token="s3cret")
    agents.append(agent)
    infer = f"{agent.url}/v2/models/toy/infer"
    assert (await post(infer, v2_infer_body(1)))[0] == 401
    assert (await post(infer, v2_infer_body(1), token="wrong"))[0] == 401
    status, doc = await post(infer, v2_infer_body(1), token="s3cret")
    assert status == 200 and doc["parameters"][SERVED_BY] == "edge"
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/v2/health/live") as resp:
        assert resp.status == 200  # health stays open, for probes
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/metrics") as resp:
        m = parse(await resp.text())  # open too: Prometheus scrapes without a token
    toy = {"model": "toy", "version": "1"}
    assert m["nv_inference_request_success_total"] == [(toy, 1.0)]
    assert m["nv_inference_request_failure_total"] == [({**toy, "reason": "401"}, 2.0)]
    served = {"model": "toy", "served_by": "edge", "reason": ""}
    assert m["fogline_requests_served_total"] == [(served, 1.0)]
    assert m["nv_inference_exec_count_total"] == [(toy, 1.0)]  # the local model ran once
    assert m["fogline_model_loaded"] == [(toy, 1.0)]


async def test_public_unauthenticated_api_never_uses_the_device_token(
    mosquitto: Any,
    package: Package,
    tmp_path: Path,
    agents: list[ServerProcess],
    recording_cloud: tuple[RecordingCloud, str],
) -> None:
    cloud, url = recording_cloud
    common = {"cloud_url": url, "cloud_token": "device-fallback-token"}
    public = start_agent(
        package, tmp_path, mosquitto, api_host="0.0.0.0", insecure_public=True, **common
    )
    agents.append(public)
    body = v2_infer_body(1, **{ROUTE: "cloud"})
    status, doc = await post(f"{public.url}/v2/models/toy/infer", body)
    assert status == 200 and doc["parameters"][SERVED_BY] == "edge"
    assert doc["parameters"][DEGRADED] is True
    assert cloud.auth == []  # the cloud never heard of this anonymous caller
    # The same agent on loopback (callers on the device itself) does escalate.
    local = start_agent(package, tmp_path, mosquitto, **common)
    agents.append(local)
    status, doc = await post(f"{local.url}/v2/models/toy/infer", body)
    assert status == 200 and cloud.auth == ["Bearer device-fallback-token"]
