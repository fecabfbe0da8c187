"""The operator's path, as separate processes: control serve, an agent, publish, rollout."""

from __future__ import annotations

import json
import time
from pathlib import Path

from common.manifest import MANIFEST_FILE, write_unsigned
from fogline.processes import ManagedProcess
from tests.conftest import free_port
from tests.fogline_cli import fogline
from tests.model_fixtures import make_package


def make_token(workdir: Path, name: str, role: str) -> str:
    made = fogline("control", "token", "create", name, "--role", role, "--workdir", str(workdir))
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def test_publish_and_rollout_commands_against_running_processes(
    private_mosquitto, tmp_path
) -> None:
    # Its own broker: "roll out to every online device" must not count other tests' devices
    # (the session broker keeps their retained status).
    mosquitto = private_mosquitto
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
        ops = make_token(tmp_path / "control", "ops", "operator")
        key = json.loads(fogline_get(control_url + "/api/keys", ops))["keys"][0]["public_key"]
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
        assert published.returncode == 1
        assert published.stderr.count("\n") == 1  # one clear line
        assert "HTTP 401" in published.stderr and "FOGLINE_TOKEN" in published.stderr
        published = fogline(
            "model", "publish", "--package", str(pkg.directory), "--control", control_url,
            env={"FOGLINE_TOKEN": ops},
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["version"] == "1"

        deadline = time.monotonic() + 20
        while "cli-dev" not in fogline_get(control_url + "/api/devices", ops):
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
            "--token",
            ops,
        )
        assert rolled.returncode == 0, rolled.stderr
        assert json.loads(rolled.stdout)["devices"]["cli-dev"]["stage"] == "activated"

        missing = fogline(
            "model", "rollout", "--model", "toy", "--version", "9", "--control", control_url,
            "--token", ops,
        )  # fmt: skip
        assert missing.returncode == 1 and "404" in missing.stderr

        # A viewer lists but may not roll out; a revoked token stops working at once.
        viewer = make_token(tmp_path / "control", "watcher", "viewer")
        listed = fogline("control", "devices", "--control", control_url, "--token", viewer)
        assert listed.returncode == 0 and "cli-dev" in listed.stdout, listed.stderr
        denied = fogline(
            "model", "rollout", "--model", "toy", "--version", "1", "--control", control_url,
            "--token", viewer,
        )  # fmt: skip
        assert denied.returncode == 1 and "HTTP 403" in denied.stderr
        assert denied.stderr.count("\n") == 1
        tokens = fogline("control", "token", "list", "--workdir", str(tmp_path / "control"))
        assert "watcher" in tokens.stdout and viewer not in tokens.stdout + tokens.stderr
        revoked = fogline(
            "control", "token", "revoke", "watcher", "--workdir", str(tmp_path / "control")
        )
        assert revoked.returncode == 0, revoked.stderr
        listed = fogline("control", "models", "--control", control_url, "--token", viewer)
        assert listed.returncode == 1 and "HTTP 401" in listed.stderr
    finally:
        for proc in reversed(procs):
            proc.stop()


def fogline_get(url: str, token: str) -> str:
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()
