"""The operator's path, as separate processes: control serve, an agent, publish, rollout."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from common.manifest import MANIFEST_FILE, write_unsigned
from fogline.processes import ManagedProcess
from tests.conftest import free_port
from tests.model_fixtures import make_package


def fogline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fogline", *args], capture_output=True, text=True, timeout=120
    )


def test_publish_and_rollout_commands_against_running_processes(mosquitto, tmp_path) -> None:
    control_url = f"http://127.0.0.1:{free_port()}"
    control = ManagedProcess(
        "control",
        [
            "control",
            "serve",
            "--workdir",
            str(tmp_path / "control"),
            "--port",
            control_url.rsplit(":", 1)[1],
            "--broker-port",
            str(mosquitto.port),
        ],
        tmp_path / "control.log",
    )
    procs = [control]
    try:
        control.wait_ready(f"{control_url}/api/health", 60, lambda d: d["broker_connected"])
        key = json.loads(fogline_get(control_url + "/api/keys"))["keys"][0]["public_key"]
        api_port = free_port()
        config = tmp_path / "agent.json"
        config.write_text(
            json.dumps(
                {
                    "device_id": "cli-dev",
                    "state_dir": str(tmp_path / "agent"),
                    "trusted_keys": [key],
                    "model": "toy",
                    "broker_port": mosquitto.port,
                    "api_port": api_port,
                }
            )
        )
        agent = ManagedProcess(
            "agent", ["edge", "run", "--config", str(config)], tmp_path / "agent.log"
        )
        procs.append(agent)
        agent.wait_ready(f"http://127.0.0.1:{api_port}/v2/health/live", 60)

        pkg = make_package(tmp_path / "pkg")
        (pkg.directory / MANIFEST_FILE).unlink()  # operators upload unsigned packages
        write_unsigned(pkg.directory, pkg.manifest)
        published = fogline(
            "model", "publish", "--package", str(pkg.directory), "--control", control_url
        )
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["version"] == "1"

        deadline = time.monotonic() + 20
        while "cli-dev" not in fogline_get(control_url + "/api/devices"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        rolled = fogline(
            "model",
            "rollout",
            "--model",
            "toy",
            "--version",
            "1",
            "--wait",
            "--control",
            control_url,
        )
        assert rolled.returncode == 0, rolled.stderr
        assert json.loads(rolled.stdout)["devices"]["cli-dev"]["stage"] == "activated"

        missing = fogline(
            "model", "rollout", "--model", "toy", "--version", "9", "--control", control_url
        )
        assert missing.returncode == 1 and "404" in missing.stderr
    finally:
        for proc in reversed(procs):
            proc.stop()


def fogline_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()
