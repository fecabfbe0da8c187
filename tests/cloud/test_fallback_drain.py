"""Operations: drain on SIGTERM behind two replicas, health, flags and environment."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cloud.fallback import FallbackSettings, build_fallback_app, register_cli, settings_from_args
from cloud.fallback.server import drain
from cloud.fallback.settings import env_name
from common.errors import InvalidInputError
from common.signing import Signer
from common.v2_server import V2_STATE
from tests.model_fixtures import Package, make_package, v2_infer_body
from tests.server_processes import start_fallback_with


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    return make_package(
        tmp_path_factory.mktemp("drainpkg"), variant="cloud", signer=Signer.generate()
    )


@pytest.fixture
async def client(package: Package) -> AsyncIterator[TestClient]:
    settings = FallbackSettings(
        packages=[package.directory], trusted_keys=[package.signer.public_key_hex]
    )
    async with TestClient(TestServer(await build_fallback_app(settings))) as c:
        yield c


async def test_drain_waits_for_requests_in_flight_and_refuses_new_ones(client: TestClient) -> None:
    app = client.server.app
    assert (await client.get("/v2/health/ready")).status == 200
    with app[V2_STATE].gate.admit():  # a request in flight
        draining = asyncio.create_task(drain(app, timeout_s=30))
        await asyncio.sleep(0.2)
        assert not draining.done()  # it waits for that request
        assert (await client.get("/v2/health/ready")).status == 503
        assert (await client.get("/v2/health/live")).status == 200
        resp = await client.post("/v2/models/toy/infer", json=v2_infer_body(1))
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert "shutting down" in (await resp.json())["error"]
    async with asyncio.timeout(10):
        await draining


class RoundRobin:
    """What a Kubernetes Service with readiness gives a client: the next replica, and
    on 503 or a refused connection, the other one."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = itertools.cycle(ports)
        self.lock = threading.Lock()
        self.ok = self.retried = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def once(self) -> None:
        body = json.dumps(v2_infer_body(1)).encode()
        for _ in range(20):
            with self.lock:
                port = next(self.ports)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request(
                    "POST", "/v2/models/toy/infer", body, {"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                status, data = resp.status, resp.read()
                conn.close()
            except (ConnectionError, http.client.RemoteDisconnected):
                # refused, reset, or a broken pipe (a replica exiting closed the socket
                # while the body was on its way): not taken, so the next replica gets it
                status, data = 0, b""
            if status == 200:
                with self.lock:
                    self.ok += 1
                return
            if status not in (0, 503):
                self.failures.append(f"{status}: {data[:200]!r}")
                return
            with self.lock:
                self.retried += 1
        self.failures.append("no replica answered in 20 tries")

    def run(self) -> None:
        while not self.stop.is_set():
            self.once()


@pytest.mark.slow  # four process starts: about 35 s on the shared 2-core host
def test_steady_traffic_through_a_restart_of_each_of_two_replicas(
    package: Package, tmp_path: Path
) -> None:
    flags = ["--package", str(package.directory), "--trust-key", package.signer.public_key_hex]
    replicas = [start_fallback_with(tmp_path, *flags) for _ in range(2)]
    ports = [int(r.url.rsplit(":", 1)[1]) for r in replicas]
    client = RoundRobin(ports)
    threads = [threading.Thread(target=client.run, daemon=True) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for i, port in enumerate(ports):
            before = client.ok
            replicas[i].stop()  # SIGTERM: drain, then exit
            assert replicas[i].proc.returncode == 0, replicas[i].log.read_text()
            replicas[i] = start_fallback_with(tmp_path, *flags, port=port)
            assert client.ok > before
    finally:
        client.stop.set()
        for t in threads:
            t.join(60)
        for r in replicas:
            r.stop()
    assert client.failures == [] and client.ok > 0
    assert client.retried > 0  # the restarts were seen, and retried on the other replica


def parse(argv: list[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fogline fallback")
    register_cli(parser.add_subparsers(dest="command", required=True), environ or {})
    return parser.parse_args(argv)


def test_every_flag_has_an_environment_variable() -> None:
    environ = {
        "FOGLINE_FALLBACK_PORT": "9001",
        "FOGLINE_FALLBACK_TRUST_KEY": "ab, cd",
        "FOGLINE_FALLBACK_DEVICE_TOKENS": "true",
        "FOGLINE_FALLBACK_NO_KEY_REFRESH": "1",
        "FOGLINE_FALLBACK_MODELS_DIR": "/srv/models",
        "FOGLINE_FALLBACK_KEEP_VERSIONS": "3",
        "FOGLINE_FALLBACK_ADMIN_TOKEN": "s1,s2",
    }
    s = settings_from_args(parse(["serve"], environ))
    assert (s.port, s.trusted_keys, s.device_tokens, s.refresh_keys) == (
        9001,
        ["ab", "cd"],
        True,
        False,
    )
    assert s.models_dir == Path("/srv/models") and s.keep_versions == 3 and s.following
    assert s.admin_tokens == {"s1", "s2"}
    assert settings_from_args(parse(["serve", "--port", "9002"], environ)).port == 9002  # flag wins
    assert settings_from_args(parse(["serve"])).device_tokens is False

    parser = argparse.ArgumentParser(prog="fogline fallback")
    sub = parser.add_subparsers()
    register_cli(sub, {})
    serve = sub.choices["serve"]
    text = serve.format_help()
    flags = [a for a in serve._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 20
    for action in flags:
        assert env_name(action) in text, action.option_strings
    assert "default: 2" in text or "(default: 2)" in text
    # A secret from the environment never shows up in --help.
    parser = argparse.ArgumentParser(prog="fogline fallback")
    sub = parser.add_subparsers()
    register_cli(
        sub, {"FOGLINE_FALLBACK_CONTROL_TOKEN": "fgo_hush", "FOGLINE_FALLBACK_TOKEN": "t-hush"}
    )
    assert "hush" not in sub.choices["serve"].format_help()


@pytest.mark.parametrize(
    ("argv", "environ", "error"),
    [
        (["serve"], {"FOGLINE_FALLBACK_DEVICE_TOKENS": "maybe"}, "true or false"),
        (["serve", "--keep-versions", "0"], {}, "--keep-versions"),
        (["serve", "--poll-s", "nan"], {}, "--poll-s"),
        (["serve", "--package", "p", "--models-dir", "d"], {}, "pin"),
        (["serve", "--models", "x*"], {}, "--control"),
        (["serve", "--drain-timeout-s", "-1"], {}, "--drain-timeout-s"),
    ],
)
def test_bad_settings_are_one_clear_error(
    argv: list[str], environ: dict[str, str], error: str
) -> None:
    with pytest.raises(InvalidInputError, match=error):
        settings_from_args(parse(argv, environ))


def test_a_bad_number_in_the_environment_is_refused_by_argparse() -> None:
    with pytest.raises(SystemExit):
        parse(["serve"], {"FOGLINE_FALLBACK_PORT": "eighty"})
