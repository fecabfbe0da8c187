"""systemd's notify protocol, spoken by a real agent process to a real AF_UNIX datagram
socket that stands in for systemd; and ``fogline edge health`` against that agent."""

from __future__ import annotations

import os
import queue
import signal
import socket
import threading
import urllib.request
import uuid
from pathlib import Path

from edge.sd_notify import READY, STOPPING, WATCHDOG, Notifier
from tests.fogline_cli import CLOUD_LIBRARIES, fogline, fogline_without
from tests.model_fixtures import make_package
from tests.server_processes import start_agent


class FakeSystemd:
    """Reads the notify socket at once, as systemd does (its queue holds only ~10)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: queue.Queue[list[str]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            self.messages.put(data.decode().split("\n"))

    def next(self, skip_watchdog: bool = False) -> list[str]:
        while True:
            lines = self.messages.get(timeout=60)
            if not (skip_watchdog and lines == [WATCHDOG]):
                return lines

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)


def test_the_agent_says_ready_feeds_the_watchdog_and_says_stopping(mosquitto, tmp_path):
    package = make_package(tmp_path / "pkg", name="toy", version="1", release=1)
    systemd = FakeSystemd(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    agent = start_agent(package, tmp_path, mosquitto, api_token="s3cret", env=env)
    try:
        first = systemd.next()
        assert first[0] == READY and first[1].startswith("STATUS=serving on "), first
        # READY means serving: the active model is loaded by then.
        with urllib.request.urlopen(f"{agent.url}/v2/health/ready", timeout=10) as resp:
            assert resp.status == 200
        assert systemd.next() == [WATCHDOG]  # every 0.2 s, at half the interval
        assert systemd.next() == [WATCHDOG]

        assert agent.config_path is not None
        healthy = fogline("edge", "health", "--config", str(agent.config_path))
        assert healthy.returncode == 0, healthy.stderr
        assert healthy.stdout == f"ready: {agent.url}/v2/health/ready\n"

        agent.proc.send_signal(signal.SIGTERM)
        assert systemd.next(skip_watchdog=True) == [STOPPING]
        assert agent.proc.wait(30) == 0
    finally:
        agent.stop()
        systemd.close()
    gone = fogline("edge", "health", "--config", str(agent.config_path), "--timeout", "5")
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr.count("\n") == 1 and gone.stderr.startswith("error: cannot reach")
    assert agent.url in gone.stderr


def test_notify_socket_forms_and_watchdog_meant_for_another_process(tmp_path) -> None:
    name = f"fogline-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)  # the abstract namespace: NOTIFY_SOCKET=@name
        listener.settimeout(10)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.notify(READY, "STATUS=x")
        assert listener.recv(100) == b"READY=1\nSTATUS=x"
    assert not Notifier({}).enabled and not Notifier({}).notify(READY)
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled and not gone.notify(READY)  # a warning, never a crash
    me = str(os.getpid())
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": me}).watchdog_s == 2.0
    assert Notifier({"WATCHDOG_USEC": "2000000"}).watchdog_s == 2.0
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    for bad in ("0", "-5", "1e6", "", "nan"):
        assert Notifier({"WATCHDOG_USEC": bad}).watchdog_s is None


def test_edge_health_with_an_empty_config_names_the_missing_keys(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    config.write_text("{}")
    # As in the slim edge image: no cloud extra, no otel extra.
    missing = (*CLOUD_LIBRARIES, "opentelemetry")
    result = fogline_without(missing, "edge", "health", "--config", str(config))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "missing required keys: device_id, state_dir, trusted_keys, model" in result.stderr
