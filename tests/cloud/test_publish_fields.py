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


def _wrong_types(manifest: dict) -> dict[str, dict]:
    """Fields a device reads (routing, tensor specs, target) with the wrong type or range.

    Red team: each was accepted, signed and stored (201); a routing threshold of
    ``"x"`` makes every request at an agent that installs it compare a float with
    a string.
    """
    tin = manifest["inputs"][0]
    return {
        "threshold str": {**manifest, "routing": {"uncertainty_threshold": "x"}},
        "threshold bool": {**manifest, "routing": {"uncertainty_threshold": True}},
        "batch str": {**manifest, "routing": {"max_local_batch": "64"}},
        "batch negative": {**manifest, "routing": {"max_local_batch": -1}},
        "metric list": {**manifest, "routing": {"uncertainty_metric": ["max_prob"]}},
        "shape str": {**manifest, "inputs": [{**tin, "shape": "abc"}]},
        "shape float": {**manifest, "inputs": [{**tin, "shape": [1.5, 2]}]},
        "shape huge": {**manifest, "inputs": [{**tin, "shape": [2**70]}]},
        "shape -5": {**manifest, "inputs": [{**tin, "shape": [-5]}]},
        "shape deep": {**manifest, "inputs": [{**tin, "shape": [1] * 100}]},
        "tensor name list": {**manifest, "inputs": [{**tin, "name": ["x"]}]},
        "datatype dict": {**manifest, "inputs": [{**tin, "datatype": {"a": 1}}]},
        "datatype unknown": {**manifest, "outputs": [{**tin, "datatype": "FP128"}]},
        "inputs none": {**manifest, "inputs": []},
        "task list": {**manifest, "task": [1]},
        "format int": {**manifest, "format": 7},
        "precision none": {**manifest, "precision": None},
        "arch int": {**manifest, "target": {"arch": 1}},
        "evaluation str": {**manifest, "evaluation": "x"},
        "evaluation value": {**manifest, "evaluation": {"accuracy": "high"}},
        "created_at int": {**manifest, "created_at": 5},
    }


async def test_wrong_types_in_manifest_fields_are_400(mosquitto, tmp_path, package) -> None:
    manifest, files = package
    async with (
        ControlPlane(tmp_path / "control", mosquitto) as cp,
        aiohttp.ClientSession(headers=cp.auth("operator")) as s,
    ):
        for i, (label, doc) in enumerate(_wrong_types(manifest).items()):
            status, body = await _post(s, cp.url, {**doc, "version": f"v{i}"}, files)
            assert status == 400 and "error" in body, (label, status, body)
        status, body = await _post(s, cp.url, manifest, files)
        assert status == 201, body
        assert [r.manifest.version for r in cp.registry.versions()] == ["2"]
