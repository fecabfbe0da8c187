"""End to end: ``fogline demo --json`` with each broker, checked as a user reads the report."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_report(broker: str, tmp_path) -> None:
    if broker == "mosquitto" and shutil.which("mosquitto") is None:
        pytest.skip("mosquitto binary not on PATH")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fogline",
            "demo",
            "--json",
            "--broker",
            broker,
            "--samples",
            "150",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout is exactly one JSON object; logs go to stderr

    assert report["broker"]["kind"] == broker
    assert report["rollout_state"] == "succeeded"
    assert len(report["agents"]) == 3
    for agent in report["agents"]:
        assert (agent["model"], agent["version"], agent["state"]) == ("digits", "1", "online")
        assert agent["url"].startswith("http://127.0.0.1:")
    acc = report["accuracy"]
    assert acc["hybrid"] >= acc["edge"] > 0.85
    assert acc["cloud"] > 0.9
    assert 0 < report["escalated_fraction"] < 0.5
    assert report["escalation_reasons"].get("uncertain", 0) > 0
    assert report["heavy_requests"]["served_by_cloud"] == report["heavy_requests"]["requests"] > 0
    assert report["errors"] == 0
    assert report["model_bytes"]["int8"] < report["model_bytes"]["fp32"]
    for key in ("local_p50", "local_p99", "escalated_p50", "escalated_p99"):
        assert report["latency_ms"][key] > 0
    assert report["rollout_seconds"] > 0
    assert set(report["endpoints"]) == {"control", "fallback", "broker"}
    assert report["endpoints"]["broker"] == report["broker"]["url"]
    assert report["broker"]["url"].startswith("mqtt://127.0.0.1:")
    assert set(report["tokens"]) == {"operator", "app"}
    assert report["tokens"]["operator"].startswith("fgo_")


def test_demo_help_explains_itself() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fogline", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert "--keep-running" in out.stdout and "--json" in out.stdout


@pytest.mark.parametrize("group", ["control", "fallback", "edge", "model", "rollout", "audit"])
def test_every_command_group_has_help(group: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fogline", group, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "usage: fogline" in out.stdout


def _endpoints_up(report: dict) -> list[bool]:
    urls = [report["endpoints"]["fallback"] + "/v2/health/live"]
    urls += [a["url"] + "/v2/health/live" for a in report["agents"]]
    urls += [report["endpoints"]["control"] + "/api/health"]
    host, port = report["broker"]["url"].removeprefix("mqtt://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        up = [True]
    except OSError:
        up = [False]
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                up.append(r.status == 200)
        except OSError:
            up.append(False)
    return up


def _anonymous_connack(url: str) -> Any:
    """The demo's broker answers an anonymous CONNECT with a refusal (it has logins and an ACL)."""
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    answers: queue.Queue[Any] = queue.Queue()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="anon", protocol=paho.MQTTv311)
    client.on_connect = lambda _c, _u, _f, rc, _p: answers.put(rc)
    client.connect(host, int(port))
    client.loop_start()
    try:
        return answers.get(timeout=10)
    finally:
        client.loop_stop()


def _check_tokens(report: dict) -> None:
    """The printed operator token opens the control plane's API; nothing else does."""
    url = report["endpoints"]["control"] + "/api/devices"
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(url, timeout=5)
    auth = {"Authorization": f"Bearer {report['tokens']['operator']}"}
    with urllib.request.urlopen(urllib.request.Request(url, headers=auth), timeout=5) as r:
        assert len(json.loads(r.read())["devices"]) == 3


def _wait_all_down(report: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_endpoints_up(report)):
        assert time.monotonic() < deadline, "a demo process outlived the demo"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_keep_running_stays_up_and_takes_everything_down_with_it(tmp_path, sig) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fogline",
            "demo",
            "--json",
            "--keep-running",
            "--samples",
            "20",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        report = json.loads(proc.stdout.readline())
        time.sleep(1)
        assert proc.poll() is None  # still up after the report
        assert all(_endpoints_up(report))
        _check_tokens(report)
        if sig == signal.SIGINT:
            assert _anonymous_connack(report["endpoints"]["broker"]).is_failure
        proc.send_signal(sig)  # Ctrl-C, or the demo itself killed outright
        code = proc.wait(60)
        assert code == (0 if sig == signal.SIGINT else -signal.SIGKILL)
        _wait_all_down(report, 15)
    finally:
        proc.kill()


def _children(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: Linux only)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue
            if f"\nPPid:\t{parent}\n" in text:
                child = int(status.parent.name)
                found.append(child)
                frontier.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_no_secret_in_a_command_line_or_a_world_readable_file(tmp_path) -> None:
    """Red team: the demo started the fallback with ``--control-token fgo_...``: any local
    user saw the control plane's token in ``ps``. Secrets go in files (0600) or the
    environment, never in argv, and never in a file other users may read."""
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fogline", "demo", "--json", "--keep-running"]
    proc = subprocess.Popen(
        [*cmd, "--agents", "1", "--samples", "20", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        report = json.loads(proc.stdout.readline())
        agents = [json.loads(p.read_text()) for p in (workdir / "agents").glob("*.json")]
        secrets = {
            "fgo_",  # every operator token
            report["tokens"]["app"],
            *(a["broker_password"] for a in agents),
            *(a["cloud_token"] for a in agents),
        }
        for pid in _children(proc.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            leaked = [s[:12] for s in secrets if s in argv]
            assert not leaked, (argv.replace("\0", " "), leaked)
        for path in workdir.rglob("*"):
            if path.is_file() and path.stat().st_mode & 0o004:
                data = path.read_bytes()
                assert b"PRIVATE KEY" not in data, path
                assert not [s for s in secrets if s.encode() in data], path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            proc.kill()


def _pid_running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_keep_running_outlives_an_agent_that_dies(tmp_path) -> None:
    """Issue 8: SIGKILL one agent of a --keep-running demo; the demo used to stop.

    Now the others keep serving, the demo says so on stderr and starts the agent
    again; Ctrl-C still ends it all with 0.
    """
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "fogline", "demo", "--json", "--keep-running"),
                *("--samples", "20", "--workdir", str(tmp_path / "demo")),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        report = json.loads(proc.stdout.readline())
        victim = report["agents"][0]["device_id"]
        (pid,) = [
            p
            for p in _children(proc.pid)
            if f"{victim}.json".encode() in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        time.sleep(1)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        others = [a["url"] for a in report["agents"][1:]]
        while not (f"{victim} exited" in stderr.read_text() and all(_endpoints_up(report))):
            assert proc.poll() is None, stderr.read_text()[-2000:]  # the demo kept running
            for url in others:  # and the other agents kept serving all along
                with urllib.request.urlopen(url + "/v2/health/live", timeout=2) as r:
                    assert r.status == 200
            assert time.monotonic() < deadline, _endpoints_up(report)
            time.sleep(0.5)
        assert not _pid_running(pid)  # it came back as a new process
        _check_tokens(report)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        _wait_all_down(report, 15)
    finally:
        proc.kill()
