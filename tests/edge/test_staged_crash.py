"""SIGKILL the control plane process mid-soak: a new one resumes the stage after the lease."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from cloud.keys import KeyStore
from cloud.registry import Registry
from edge.agent import EdgeAgent
from tests.broker_per_test import mosquitto_per_test  # noqa: F401  (own broker)
from tests.conftest import free_port, wait_port
from tests.edge.agent_harness import agent_config
from tests.model_fixtures import make_package

ROOT = Path(__file__).resolve().parents[2]


def _serve(workdir: Path, port: int, broker, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "fogline", "control", "serve", "--workdir", str(workdir)]
    argv += ["--port", str(port), "--broker-host", broker.host]
    argv += ["--broker-port", str(broker.port), "--chunk-size", "1024"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wait_port("127.0.0.1", port, timeout=60)
    return proc


@pytest.mark.slow
async def test_sigkill_mid_soak_then_a_new_process_finishes_the_rollout(mosquitto, tmp_path):
    workdir = tmp_path / "control"
    workdir.mkdir()
    signer = KeyStore(workdir).open_or_create()
    registry = Registry(workdir / "control.sqlite", workdir / "store", chunk_size=1024)
    for version in ("1", "2"):
        pkg = make_package(tmp_path / f"pkg-{version}", version=version, release=int(version))
        registry.publish(pkg.directory, pkg.manifest, signer)
    token = registry.operators.create("ops", "operator")
    registry.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}
    proc = _serve(workdir, port, mosquitto, tmp_path / "control.log")
    try:
        async with contextlib.AsyncExitStack() as stack:
            session = await stack.enter_async_context(aiohttp.ClientSession(headers=headers))
            configs = [
                agent_config(tmp_path, f"dev-{i}", mosquitto, signer.public_key_hex)
                for i in range(2)
            ]
            for config in configs:
                await stack.enter_async_context(EdgeAgent(config))

            async def call(method: str, path: str, body: object = None) -> dict:
                async with session.request(method, url + path, json=body) as resp:
                    return await resp.json()

            async def until(path: str, check, timeout: float = 90) -> dict:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    with contextlib.suppress(aiohttp.ClientError):
                        doc = await call("GET", path)
                        if check(doc):
                            return doc
                    await asyncio.sleep(0.2)
                raise AssertionError(f"{path}: never {check}")

            await until(
                "/api/devices", lambda d: sum(x["state"] == "online" for x in d["devices"]) == 2
            )
            first = await call("POST", "/api/rollouts", {"model": "toy", "version": "1"})
            await until(f"/api/rollouts/{first['id']}", lambda r: r["state"] == "succeeded")
            created = await call(
                "POST",
                "/api/staged-rollouts",
                {"model": "toy", "version": "2", "stages": "50%,100%", "soak": "4s"},
            )
            path = f"/api/staged-rollouts/{created['id']}"
            await until(path, lambda r: r["phase"] == "soaking")
            os.kill(proc.pid, signal.SIGKILL)  # no clean stop: its lease must run out
            proc.wait(10)
            proc = _serve(workdir, port, mosquitto, tmp_path / "control.log")
            done = await until(path, lambda r: r["finished"], timeout=120)
            assert done["state"] == "succeeded", done
            assert [d["state"] for d in done["devices"]] == ["active", "active"]
            assert [r["stage"] for r in done["reports"]] == [0, 1]
    finally:
        proc.kill()
        proc.wait()
