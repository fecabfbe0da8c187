"""Manifest fields of the wrong type or out of range, uploaded by an operator.

Red team: ``release: 2**70`` passed validation, the package was placed in the
store, then the database refused the integer: a 500, and the version's
directory stayed behind with no row, so every later (valid) upload of that
version got 409 "exists in the store already" -- with the server's store path
in the message.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.cloud.test_control_paths import _multipart
from tests.edge.agent_harness import ControlPlane
from tests.model_fixtures import make_package


@pytest.fixture
def package(tmp_path):
    pkg = make_package(tmp_path / "upload", version="2", release=2)
    files = [(f.name, (pkg.directory / f.name).read_bytes()) for f in pkg.manifest.files]
    return pkg.manifest.to_dict(), files


async def _post(s: aiohttp.ClientSession, url: str, doc: dict, files) -> tuple[int, dict]:
    body, ctype = _multipart(doc, files)
    async with s.post(f"{url}/api/models", data=body, headers={"Content-Type": ctype}) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("release", [2**70, 2**63, 2**31])
async def test_a_huge_release_is_400_and_leaves_nothing_behind(
    mosquitto, tmp_path, package, release
) -> None:
    manifest, files = package
    async with (
        ControlPlane(tmp_path / "control", mosquitto) as cp,
        aiohttp.ClientSession(headers=cp.auth("operator")) as s,
    ):
        status, body = await _post(s, cp.url, {**manifest, "release": release}, files)
        assert status == 400 and "release" in body["error"]
        status, body = await _post(s, cp.url, manifest, files)  # the honest one still goes in
        assert status == 201, body
        status, body = await _post(s, cp.url, manifest, files)
        assert status == 409 and str(tmp_path) not in body["error"]
