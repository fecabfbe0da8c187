"""Real server processes for request-hardening tests: the fallback and an agent.

Each runs as its own process (the memory figures are that process's own, read
from ``/proc/<pid>/status``) and is reached over real HTTP on loopback.
Plain helper module: ``from tests.server_processes import start_fallback, start_agent``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common.signing import TrustStore
from edge.config import AgentConfig
from edge.model_store import ModelStore
from tests.conftest import free_port
from tests.model_fixtures import Package

ROOT = Path(__file__).resolve().parents[1]

FALLBACK_SCRIPT = """
import argparse, logging, sys
from cloud.fallback import register_cli
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
parser = argparse.ArgumentParser()
register_cli(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


class ServerProcess:
    """A server we started: its URL, its memory, and a way to stop it."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log
        self.config_path: Path | None = None  # an agent's config file

    def status_kb(self, field: str) -> int:
        """``VmRSS`` (now) or ``VmHWM`` (peak) of the process, in kB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise KeyError(field)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/live", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise AssertionError(f"{self.url} never came up: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _spawn(
    argv: list[str], log: Path, url: str, extra_env: dict[str, str] | None = None
) -> ServerProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, url, log)
    server.wait_ready()
    return server


def start_fallback(package: Package, tmp: Path, *flags: str) -> ServerProcess:
    """``fogline fallback serve`` on a free port, open (no tokens), serving ``package``."""
    flags = (
        "--package",
        str(package.directory),
        "--trust-key",
        package.signer.public_key_hex,
        *flags,
    )
    return start_fallback_with(tmp, *flags)


def start_fallback_with(
    tmp: Path, *flags: str, port: int | None = None, env: dict[str, str] | None = None
) -> ServerProcess:
    """``fogline fallback serve`` with these flags (and environment) on ``port`` (or a free one)."""
    port = port or free_port()
    argv = [sys.executable, "-c", FALLBACK_SCRIPT, "serve", "--port", str(port), *flags]
    return _spawn(argv, tmp / f"fallback-{port}.log", f"http://127.0.0.1:{port}", env)


def install_active(config: AgentConfig, package: Package) -> None:
    """Put ``package`` in the agent's active slot, as a finished rollout would."""
    store = ModelStore(config.state_dir, TrustStore(config.trusted_keys))
    files = {f.name: (package.directory / f.name).read_bytes() for f in package.manifest.files}
    store.activate(store.stage(package.signed, files))


def start_agent(
    package: Package, tmp: Path, broker: Any, *, env: dict[str, str] | None = None, **config: Any
) -> ServerProcess:
    """``fogline edge run`` with ``package`` already active in its store (no rollout needed).

    ``env``: more environment for the process (``NOTIFY_SOCKET``, say)."""
    from tests.edge.agent_harness import agent_config

    device = f"dev-{free_port()}"
    cfg = agent_config(tmp, device, broker, package.signer.public_key_hex, **config)
    install_active(cfg, package)
    config_path = tmp / f"{device}.json"
    config_path.write_text(json.dumps(cfg.to_dict()))
    argv = [sys.executable, "-m", "fogline", "edge", "run", "--config", str(config_path)]
    server = _spawn(argv, tmp / f"{device}.log", f"http://127.0.0.1:{cfg.api_port}", env)
    server.config_path = config_path
    return server
