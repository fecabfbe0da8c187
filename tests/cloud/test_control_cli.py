"""The operator CLI as an operator meets it: real ``fogline`` processes against a real
control plane on loopback. Errors are one line naming the URL, exit codes say whose
fault it was, data formats parse, and a closed pipe is quiet."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tomllib

import pytest
import yaml

from cloud.control_client import ControlApi, ControlClient, ControlUnreachableError
from tests.conftest import free_port
from tests.edge.agent_harness import ControlPlane
from tests.fogline_cli import CLEAN_ENV, CLOUD_LIBRARIES, ROOT, fogline, fogline_without
from tests.model_fixtures import onnx_model_bytes


async def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``fogline`` in a child process, off the loop that serves the control plane."""
    return await asyncio.to_thread(fogline, *args, env=env)


def one_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A failure an operator can read: one ``error:`` line with each needle, no traceback."""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_version_prints_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    result = fogline("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"fogline {version}"


def test_a_bad_url_is_a_usage_error_and_a_refused_port_names_the_url() -> None:
    bad = fogline("control", "devices", "--control", "foo")
    assert bad.returncode == 2
    one_line(bad, "'foo'", "http(s)://HOST")
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    refused = fogline("control", "models", env={"FOGLINE_CONTROL": url})
    assert refused.returncode == 1
    one_line(refused, f"{url}/api/models", "connection refused")


def test_every_option_has_help_and_defaults_show(capsys: pytest.CaptureFixture[str]) -> None:
    from fogline.cli import build_parser

    missing = []
    for path, parser in _parsers(build_parser(), "fogline"):
        for action in parser._actions:
            if action.option_strings and not action.help and path != "fogline demo":
                missing.append(f"{path} {action.option_strings[0]}")
    assert missing == []  # `fogline demo` is another team's file (fogline/demo.py)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["control", "serve", "--help"])
    assert "(default: 8000)" in " ".join(capsys.readouterr().out.split())


def _parsers(parser, path):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


async def test_errors_formats_and_environment_against_a_real_control_plane(
    private_mosquitto, tmp_path
) -> None:
    # Its own broker: the device list must be empty, and the session broker keeps the
    # retained status of every device that earlier tests on this worker started.
    async with ControlPlane(tmp_path / "control", private_mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        viewer = {"FOGLINE_CONTROL": cp.url, "FOGLINE_TOKEN": cp.tokens["viewer"]}

        listed = await run("control", "models", "-o", "json", env=viewer)  # all from env
        assert listed.returncode == 0, listed.stderr
        assert [m["version"] for m in json.loads(listed.stdout)["models"]] == ["1"]
        as_yaml = await run("control", "devices", "-o", "yaml", env=viewer)
        assert as_yaml.returncode == 0 and yaml.safe_load(as_yaml.stdout) == {"devices": []}
        table = await run("control", "models", "--control", cp.url, env=viewer)
        assert table.stdout.startswith("NAME") and "toy" in table.stdout

        no_token = await run("control", "devices", "--control", cp.url)
        assert no_token.returncode == 1
        one_line(no_token, f"{cp.url}/api/devices", "HTTP 401", "FOGLINE_TOKEN")
        rollout = ["model", "rollout", "--model", "toy", "--version", "1"]
        forbidden = await run(*rollout, env=viewer)
        assert forbidden.returncode == 1
        one_line(forbidden, f"{cp.url}/api/rollouts", "HTTP 403")
        operator = {**viewer, "FOGLINE_TOKEN": cp.tokens["operator"]}
        unknown = await run("model", "rollout", "--model", "toy", "--version", "9", env=operator)
        assert unknown.returncode == 1
        one_line(unknown, f"{cp.url}/api/rollouts", "HTTP 404")

        # Seen once (a rollout target must be a seen or enrolled device), silent since.
        cp.registry.upsert_device("ghost", {"state": "offline"})
        started = await run(*rollout, "--device", "ghost", env=operator)  # never answers
        assert started.returncode == 0, started.stderr
        rollout_id = started.stdout.strip()
        listed = await run("control", "rollouts", "-o", "json", env=viewer)
        assert [r["id"] for r in json.loads(listed.stdout)["rollouts"]] == [rollout_id]
        shown = await run("control", "rollout", rollout_id, env=viewer)
        assert shown.returncode == 0 and shown.stdout.startswith("ID")
        assert rollout_id in shown.stdout
        missing = await run("control", "rollout", "r-nope", env=viewer)
        assert missing.returncode == 1
        one_line(missing, f"{cp.url}/api/rollouts/r-nope", "HTTP 404")
        bad = await run("control", "rollout", "../keys", env=viewer)
        assert bad.returncode == 2
        one_line(bad, "rollout id")


async def test_a_closed_pipe_is_quiet(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        env = {**CLEAN_ENV, "FOGLINE_CONTROL": cp.url, "FOGLINE_TOKEN": cp.tokens["viewer"]}
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first byte, as after `head` exits
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fogline", "control", "models", "--json",
            stdout=write_end, stderr=subprocess.PIPE, cwd=ROOT, env=env,
        )  # fmt: skip
        os.close(write_end)
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert stderr == b"" and proc.returncode == 1  # the docs' advice: exit 1, no traceback
        head = await asyncio.to_thread(
            subprocess.run,
            f"{sys.executable} -m fogline control models --json | head -n 1",
            shell=True, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
        )  # fmt: skip
        assert head.stdout == "{\n" and head.stderr == ""


async def test_accuracy_shows_for_a_package_built_by_model_package(mosquitto, tmp_path) -> None:
    model = tmp_path / "toy.onnx"
    model.write_bytes(onnx_model_bytes(0))  # digits-shaped: FP32 [N, 64] -> 10 classes
    pkg = tmp_path / "pkg"
    built = await run(
        "model", "package", "--model", str(model), "--out", str(pkg), "--name", "toy",
        "--version", "1", "--release", "1", "--variant", "edge", "--precision", "fp32",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        env = {"FOGLINE_CONTROL": cp.url, "FOGLINE_TOKEN": cp.tokens["operator"]}
        published = await run("model", "publish", "--package", str(pkg), env=env)
        assert published.returncode == 0, published.stderr
        accuracy = json.loads(published.stdout)["evaluation"]["accuracy"]
        listed = await run("control", "models", env=env)
        assert listed.returncode == 0, listed.stderr
        header, row = listed.stdout.splitlines()
        assert header.split()[-1] == "ACCURACY" and row.split()[-1] == f"{accuracy:.2%}"


def edge_only(*args: str) -> subprocess.CompletedProcess[str]:
    """An edge-only install (`pip install '.[edge]'`): the cloud extra's libraries cannot load."""
    return fogline_without(CLOUD_LIBRARIES, *args)


def test_an_edge_only_install_names_the_cloud_extra(tmp_path) -> None:
    listing = edge_only("--help")
    assert listing.returncode == 0, listing.stderr
    assert " ".join(listing.stdout.split()).count("[needs the cloud extra]") == 2  # demo, model
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not checked: the extra is missing first")
    for argv in (
        ["demo"],
        ["model", "train", "--model", "digits-edge", "--out", str(tmp_path / "m.onnx")],
        ["model", "package", "--model", str(model), "--out", str(tmp_path / "pkg"),
         "--name", "m", "--version", "1", "--release", "1", "--variant", "edge",
         "--precision", "fp32"],
    ):  # fmt: skip
        result = edge_only(*argv)
        assert result.returncode == 1
        one_line(result, f"fogline {' '.join(argv[:2]) if argv[0] == 'model' else 'demo'}")
        one_line(result, "'.[cloud]'")
    url = f"http://127.0.0.1:{free_port()}"  # the operator client needs no cloud extra
    one_line(edge_only("control", "devices", "--control", url), url, "connection refused")
    empty = tmp_path / "agent.json"
    empty.write_text("{}")
    agent = edge_only("edge", "run", "--config", str(empty))
    assert agent.returncode == 2
    assert "missing required keys: device_id, state_dir, trusted_keys, model" in agent.stderr


async def test_a_silent_server_times_out_with_the_url() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # takes the request, never answers
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, ControlApi(url, timeout=0.3) as api:
        with pytest.raises(ControlUnreachableError, match=rf"GET {url}/api/devices: no answer"):
            await api.get("/api/devices")


async def test_the_sync_client_works_from_inside_a_running_loop(mosquitto, tmp_path) -> None:
    """The demo calls ``ControlClient`` from async code; it must not need a loop of its own."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        client = ControlClient(cp.url, token=cp.tokens["viewer"])

        async def caller() -> list[str]:  # another thread's running loop, like the demo's
            return [m["version"] for m in client.get("/api/models")["models"]]

        assert await asyncio.to_thread(asyncio.run, caller()) == ["1"]


def test_offline_lists_take_the_same_formats(tmp_path) -> None:
    work = str(tmp_path / "control")
    assert fogline("keys", "create", "--workdir", work).returncode == 0
    out = str(tmp_path / "d1.json")
    enrolled = fogline("device", "enroll", "d1", "--workdir", work, "--out", out, "--label", "a=b")
    assert enrolled.returncode == 0, enrolled.stderr
    devices = json.loads(fogline("device", "list", "--workdir", work, "-o", "json").stdout)
    assert [(d["device_id"], d["labels"]) for d in devices["devices"]] == [("d1", {"a": "b"})]
    assert fogline("device", "list", "--workdir", work).stdout.split()[:3] == [
        "DEVICE", "ENROLLED", "LABELS",
    ]  # fmt: skip
    assert fogline("control", "token", "create", "ops", "--role", "viewer", "--workdir", work)
    tokens = yaml.safe_load(
        fogline("control", "token", "list", "--workdir", work, "-o", "yaml").stdout
    )
    assert [(t["name"], t["role"]) for t in tokens] == [("ops", "viewer")]
    keys = json.loads(fogline("keys", "list", "--workdir", work, "--json").stdout)
    assert [k["state"] for k in keys] == ["active"]
