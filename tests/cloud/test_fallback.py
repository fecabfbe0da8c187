"""The cloud fallback: real signed packages, real ONNX Runtime, real HTTP on loopback."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from cloud.fallback import (
    FALLBACK_REPOSITORY,
    FallbackSettings,
    build_fallback_app,
    register_cli,
    settings_from_args,
)
from common.errors import InvalidInputError, ModelNotFoundError, VerificationError
from common.inference import MODEL_VERSION, SERVED_BY
from common.manifest import MANIFEST_FILE, SignedManifest, write_package
from common.signing import Signer
from tests.model_fixtures import Package, make_package, reference_output, toy_input, v2_infer_body

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fallback-token"


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Package:
    return make_package(
        tmp_path_factory.mktemp("cloudpkg"), version="c1", variant="cloud", seed=3, signer=signer
    )


def settings_for(package: Package, signer: Signer, **kw: object) -> FallbackSettings:
    base = FallbackSettings(
        packages=[package.directory], trusted_keys=[signer.public_key_hex], tokens={TOKEN}
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def client(package: Package, signer: Signer) -> AsyncIterator[TestClient]:
    app = await build_fallback_app(settings_for(package, signer))
    c = TestClient(TestServer(app, host="127.0.0.1"))
    await c.start_server()
    yield c
    await c.close()


def infer_body(rows: int) -> dict[str, object]:
    x = toy_input(rows)
    return {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": x.ravel().tolist()}
        ]
    }


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_serves_verified_package(client: TestClient, package: Package) -> None:
    resp = await client.post("/v2/models/toy/infer", json=infer_body(3), headers=AUTH)
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert doc["parameters"][SERVED_BY] == "cloud"
    assert doc["parameters"][MODEL_VERSION] == "c1" and doc["model_version"] == "c1"
    out = doc["outputs"][0]
    want = reference_output(package.model_path, toy_input(3))
    np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), want, atol=1e-6)


async def test_health_open_and_the_rest_authenticated(client: TestClient) -> None:
    assert (await client.get("/v2/health/ready")).status == 200
    assert (await client.get("/v2/models/toy")).status == 401
    assert (await client.post("/v2/models/toy/infer", json=infer_body(1))).status == 401
    resp = await client.get("/v2/models/toy", headers=AUTH)
    doc = await resp.json()
    assert doc["versions"] == ["c1"] and doc["parameters"]["fogline.variant"] == "cloud"


async def test_bad_input_is_400_then_serves_again(client: TestClient) -> None:
    bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    resp = await client.post("/v2/models/toy/infer", json=bad, headers=AUTH)
    assert resp.status == 400 and "shape" in (await resp.json())["error"]
    resp = await client.post("/v2/models/toy/infer", json=infer_body(1), headers=AUTH)
    assert resp.status == 200


async def test_cleanup_unloads(package: Package, signer: Signer) -> None:
    app = await build_fallback_app(settings_for(package, signer))
    c = TestClient(TestServer(app, host="127.0.0.1"))
    await c.start_server()
    runtimes = list(app[FALLBACK_REPOSITORY])
    assert runtimes and all(r.ready for r in runtimes)
    await c.close()
    assert not any(r.ready for r in runtimes)


async def test_no_trusted_keys_checks_digests_only(package: Package, signer: Signer) -> None:
    app = await build_fallback_app(settings_for(package, signer, trusted_keys=[], tokens=None))
    assert [r.info.version for r in app[FALLBACK_REPOSITORY]] == ["c1"]


async def test_package_signed_by_untrusted_key_is_refused(package: Package, tmp_path: Path) -> None:
    stranger = make_package(tmp_path / "p", signer=Signer.generate())
    with pytest.raises(VerificationError):
        await build_fallback_app(settings_for(stranger, package.signer))


async def test_tampered_manifest_is_refused(package: Package, tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "p", signer=package.signer)
    doc = json.loads((pkg.directory / MANIFEST_FILE).read_text())
    doc["manifest"]["routing"]["max_local_batch"] = 10_000  # changed after signing
    (pkg.directory / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(VerificationError, match="bad signature"):
        await build_fallback_app(settings_for(pkg, package.signer))


async def test_tampered_model_file_is_refused(package: Package, tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "p", signer=package.signer)
    data = bytearray(pkg.model_path.read_bytes())
    data[-10] ^= 0xFF
    pkg.model_path.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="SHA-256"):
        await build_fallback_app(settings_for(pkg, package.signer))


async def test_two_packages_of_one_model_are_refused(
    package: Package, signer: Signer, tmp_path: Path
) -> None:
    other = make_package(tmp_path / "p", version="c2", signer=signer)
    settings = settings_for(package, signer, packages=[package.directory, other.directory])
    with pytest.raises(InvalidInputError, match="two packages"):
        await build_fallback_app(settings)


async def test_unloadable_model_is_a_clear_error(signer: Signer, tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "p", signer=signer)
    junk = b"not an onnx model"
    pkg.model_path.write_bytes(junk)
    entry = replace(
        pkg.manifest.file("model"), size=len(junk), sha256=hashlib.sha256(junk).hexdigest()
    )
    files = [entry if f.role == "model" else f for f in pkg.manifest.files]
    manifest = replace(pkg.manifest, files=files)
    write_package(pkg.directory, SignedManifest.sign(manifest, signer))
    with pytest.raises(InvalidInputError, match="cannot load the model"):
        await build_fallback_app(settings_for(pkg, signer))


# --- command line ----------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fogline fallback")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_settings(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# fleet A\nalpha\n\n beta \n")
    args = parse(
        [
            "serve",
            "--package",
            "a",
            "--package",
            "b",
            "--trust-key",
            "ab",
            "--token",
            "t1",
            "--tokens-file",
            str(tokens),
            "--max-inflight",
            "8",
            "--port",
            "9000",
        ]
    )
    s = settings_from_args(args)
    assert s.packages == [Path("a"), Path("b")] and s.trusted_keys == ["ab"]
    assert s.tokens == {"t1", "alpha", "beta"} and s.max_inflight == 8 and s.port == 9000
    assert settings_from_args(parse(["serve", "--package", "a"])).tokens is None


def test_cli_missing_package_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["serve", "--package", str(tmp_path / "nope"), "--port", "0"])
    assert args.func(args) == 2
    assert "cannot read manifest" in capsys.readouterr().err


def test_cli_bad_signature_exits_2(package: Package, capsys: pytest.CaptureFixture[str]) -> None:
    other = Signer.generate().public_key_hex
    args = parse(["serve", "--package", str(package.directory), "--trust-key", other])
    assert args.func(args) == 2
    assert "untrusted key" in capsys.readouterr().err


CLI_SCRIPT = """
import argparse, logging, sys
from cloud.fallback import register_cli
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
parser = argparse.ArgumentParser()
register_cli(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_cli_serves_until_sigterm(package: Package, signer: Signer) -> None:
    import urllib.request

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLI_SCRIPT,
            "serve",
            "--port",
            "0",
            "--package",
            str(package.directory),
            "--trust-key",
            signer.public_key_hex,
            "--token",
            TOKEN,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log = LogReader(proc)
    try:
        url = log.wait_for(r"at (http://\S+/v2)", timeout=60)
        req = urllib.request.Request(
            f"{url}/models/toy/infer",
            data=json.dumps(infer_body(2)).encode(),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.load(resp)["parameters"][SERVED_BY] == "cloud"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


class LogReader:
    """Reads a process's stderr in a thread, so waiting for a line can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.proc, self.stream = proc, proc.stderr
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for line in self.stream:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError(f"exited {self.proc.returncode}: {self.seen}") from None
                continue
            self.seen.append(line)
            if found := re.search(pattern, line):
                return found.group(1)
        raise AssertionError(f"never logged {pattern!r}: {self.seen}")

    def close(self) -> None:
        self.thread.join(10)  # the process has exited: the pipe reaches EOF
        self.stream.close()


async def test_fallback_fetches_its_model_from_the_control_plane(mosquitto, tmp_path) -> None:
    """``--control URL --model NAME:VERSION``: download, verify, cache, serve."""
    from tests.edge.agent_harness import ControlPlane

    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        pkg = make_package(tmp_path / "cloud-pkg", name="toy", variant="cloud")
        cp.registry.publish(pkg.directory, pkg.manifest, cp.signer)
        settings = FallbackSettings(
            control_url=cp.url,
            control_token=cp.tokens["viewer"],
            models=["toy:1"],
            cache_dir=tmp_path / "cache",
            trusted_keys=[cp.signer.public_key_hex],
        )
        app = await build_fallback_app(settings)
        async with TestClient(TestServer(app)) as client:
            body = v2_infer_body(1)
            resp = await client.post("/v2/models/toy/infer", json=body)
            assert resp.status == 200
            assert (await resp.json())["parameters"]["fogline.served_by"] == "cloud"
        assert (tmp_path / "cache" / "toy" / "cloud" / "1" / "manifest.json").is_file()

        # Unknown version, or a cache signed by someone else: refused at start.
        with pytest.raises(ModelNotFoundError):
            await build_fallback_app(
                FallbackSettings(
                    control_url=cp.url,
                    control_token=cp.tokens["viewer"],
                    models=["toy:9"],
                    cache_dir=tmp_path / "cache",
                )
            )
        with pytest.raises(VerificationError):
            await build_fallback_app(
                FallbackSettings(
                    control_url=cp.url,
                    models=["toy:1"],
                    cache_dir=tmp_path / "cache",
                    trusted_keys=[Signer.generate().public_key_hex],
                )
            )


async def test_device_tokens_signed_by_a_trusted_key_are_accepted(tmp_path) -> None:
    from common.device_token import issue_token

    signer = Signer.generate()
    pkg = make_package(tmp_path / "pkg", variant="cloud", signer=signer)
    app = await build_fallback_app(
        FallbackSettings(
            packages=[pkg.directory],
            trusted_keys=[signer.public_key_hex],
            tokens={"static-ok"},
            device_tokens=True,
        )
    )
    body = v2_infer_body(1)
    async with TestClient(TestServer(app)) as client:
        for token, status in [
            (issue_token(signer, "dev-1"), 200),
            ("static-ok", 200),
            (issue_token(Signer.generate(), "dev-1"), 401),
            (issue_token(signer, "dev-1", lifetime_s=-1), 401),
            (None, 401),
        ]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            resp = await client.post("/v2/models/toy/infer", json=body, headers=headers)
            assert resp.status == status, (token, await resp.text())
    with pytest.raises(InvalidInputError, match="trust-key"):
        await build_fallback_app(FallbackSettings(packages=[pkg.directory], device_tokens=True))
