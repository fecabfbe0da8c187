"""The fallback's package fetch against a hostile control plane (a real server on loopback).

The signed manifest is checked against the trusted keys BEFORE any artifact
byte is asked for; size comes from the signed manifest only; every file is
checked against it after the download.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cloud.package_cache import fetch_package, parse_model_ref
from common.errors import AuthError, InvalidInputError, VerificationError
from common.manifest import artifact_bytes
from common.signing import Signer, TrustStore
from tests.model_fixtures import make_package


class HostilePlane:
    """Serves whatever model metadata and artifact bytes a test gives it; counts bytes out."""

    def __init__(self, meta: dict[str, Any], artifact: bytes) -> None:
        self.meta, self.artifact = meta, artifact
        self.artifact_requests = 0
        self.artifact_bytes_sent = 0
        self.auth: list[str | None] = []
        app = web.Application()
        app.router.add_get("/api/models/{name}/versions/{version}", self._model)
        app.router.add_get("/api/artifacts/{digest}", self._artifact)
        self.server = TestServer(app, host="127.0.0.1")

    async def _model(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization"))
        return web.json_response(self.meta)

    async def _artifact(self, request: web.Request) -> web.Response:
        self.artifact_requests += 1
        self.artifact_bytes_sent += len(self.artifact)
        return web.Response(body=self.artifact)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


def _served(signer: Signer, tmp_path, **overrides: Any) -> tuple[dict[str, Any], bytes]:
    """What an honest plane would answer for toy 1 (cloud), signed by ``signer``."""
    pkg = make_package(tmp_path / "pkg", variant="cloud", signer=signer)
    data = artifact_bytes(pkg.directory, pkg.manifest)
    meta = {
        "signed_manifest": pkg.signed.to_dict(),
        "artifact": {"digest": hashlib.sha256(data).hexdigest(), "size": len(data)},
    }
    meta["artifact"].update(overrides)
    return meta, data


async def _fetch(plane: HostilePlane, trusted: Signer, cache) -> Any:
    return await fetch_package(
        plane.url,
        "toy",
        "1",
        variant="cloud",
        cache_dir=cache,
        trust=TrustStore([trusted.public_key_hex]),
        token="fgo_viewer",
    )


async def test_an_untrusted_signature_is_refused_before_any_artifact_byte(tmp_path) -> None:
    trusted, attacker = Signer.generate(), Signer.generate()
    meta, data = _served(attacker, tmp_path)
    plane = HostilePlane(meta, data + b"\0" * 1_000_000)
    async with plane.server:
        with pytest.raises(VerificationError, match="untrusted key"):
            await _fetch(plane, trusted, tmp_path / "cache")
    assert plane.artifact_requests == 0 and plane.artifact_bytes_sent == 0
    assert plane.auth == ["Bearer fgo_viewer"]  # the control token went along
    assert not (tmp_path / "cache" / "toy").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        {"size": 60_000_000},  # endless data: the server's size is not the signed one
        {"size": "12"},
        {"digest": "../../../keys/signing.pem"},
        {"digest": "A" * 64},
    ],
)
async def test_unsigned_figures_that_disagree_are_refused_before_download(tmp_path, overrides):
    signer = Signer.generate()
    meta, data = _served(signer, tmp_path, **overrides)
    plane = HostilePlane(meta, data)
    async with plane.server:
        with pytest.raises((VerificationError, InvalidInputError)):
            await _fetch(plane, signer, tmp_path / "cache")
    assert plane.artifact_requests == 0


async def test_a_manifest_for_another_model_is_refused(tmp_path) -> None:
    """Mix-and-match: a genuinely signed manifest, but not the one asked for."""
    signer = Signer.generate()
    pkg = make_package(tmp_path / "pkg", name="other", variant="cloud", signer=signer)
    data = artifact_bytes(pkg.directory, pkg.manifest)
    meta = {
        "signed_manifest": pkg.signed.to_dict(),
        "artifact": {"digest": hashlib.sha256(data).hexdigest(), "size": len(data)},
    }
    plane = HostilePlane(meta, data)
    async with plane.server:
        with pytest.raises(VerificationError, match="other"):
            await _fetch(plane, signer, tmp_path / "cache")
    assert plane.artifact_requests == 0


async def test_bytes_that_do_not_match_the_signed_files_are_refused(tmp_path) -> None:
    signer = Signer.generate()
    meta, data = _served(signer, tmp_path)
    forged = bytes([data[0] ^ 1]) + data[1:]  # same size; its own digest advertised
    meta["artifact"]["digest"] = hashlib.sha256(forged).hexdigest()
    plane = HostilePlane(meta, forged)
    async with plane.server:
        with pytest.raises(VerificationError, match="SHA-256"):
            await _fetch(plane, signer, tmp_path / "cache")
    assert not (tmp_path / "cache" / "toy").exists()


async def test_the_honest_answer_is_cached(tmp_path) -> None:
    signer = Signer.generate()
    meta, data = _served(signer, tmp_path)
    plane = HostilePlane(meta, data)
    async with plane.server:
        path = await _fetch(plane, signer, tmp_path / "cache")
    assert path == tmp_path / "cache" / "toy" / "cloud" / "1"
    assert plane.artifact_bytes_sent == len(data)


async def test_the_real_control_plane_needs_the_control_token(mosquitto, tmp_path) -> None:
    from tests.edge.agent_harness import ControlPlane

    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        pkg = make_package(tmp_path / "cloud-pkg", variant="cloud")
        cp.registry.publish(pkg.directory, pkg.manifest, cp.signer)
        trust = TrustStore([cp.signer.public_key_hex])
        with pytest.raises(AuthError, match="FOGLINE_CONTROL_TOKEN"):
            await fetch_package(
                cp.url, "toy", "1", variant="cloud", cache_dir=tmp_path / "c", trust=trust
            )
        path = await fetch_package(
            cp.url,
            "toy",
            "1",
            variant="cloud",
            cache_dir=tmp_path / "c",
            trust=trust,
            token=cp.tokens["viewer"],
        )
        assert (path / "manifest.json").is_file()


@pytest.mark.parametrize("ref", ["../x:1", "toy:../../1", "toy:/abs", "to\x00y:1", "toy"])
def test_model_refs_are_checked(ref) -> None:
    with pytest.raises(InvalidInputError):
        parse_model_ref(ref)
