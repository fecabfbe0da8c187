"""Lineage end to end: `fogline model package` with a compression sidecar, a real publish
through a real control plane, and `fogline model list|show|lineage` as an operator reads them;
attacks on the lineage fields at the publish route."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import yaml

from cloud.control_client import ControlApi
from cloud.pipeline.package import package_lineage
from cloud.pipeline.sidecar import Sidecar, read_sidecar, sidecar_path, write_sidecar
from common.errors import InvalidInputError
from common.manifest import UNSIGNED_MANIFEST_FILE, sha256_file
from tests.edge.agent_harness import ControlPlane
from tests.fogline_cli import fogline
from tests.model_fixtures import onnx_model_bytes, toy_input


async def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(fogline, *args, env=env)


def _data(path: Path) -> Path:
    x = toy_input(64, seed=3)
    labels = np.random.default_rng(0).integers(0, 10, 64)
    np.savez(path, input=x, labels=labels)
    return path


def _package_args(model: Path, data: Path, out: Path, version: str, *extra: str) -> list[str]:
    return [
        "model", "package", "--model", str(model), "--data", str(data), "--out", str(out),
        "--name", "toy", "--version", version, "--release", version, "--variant", "edge",
        "--precision", "fp32", "--latency-budget-ms", "1", *extra,
    ]  # fmt: skip


def one_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


async def test_package_publish_and_read_back_lineage(mosquitto, tmp_path) -> None:
    data = _data(tmp_path / "d.npz")
    parent = tmp_path / "parent.onnx"
    parent.write_bytes(onnx_model_bytes(0))
    child = tmp_path / "child.onnx"
    child.write_bytes(onnx_model_bytes(1))
    sidecar = Sidecar(
        method="prune-structured-30%",
        params={"amount": 0.3, "finetune_epochs": 5},
        parent_sha256=sha256_file(parent),
        quality_metric="accuracy",
        metrics={"quality": 0.5, "parent_quality": 0.51, "latency_p50_ms_b1": 0.02},
    )
    write_sidecar(child, sidecar)

    # A parent never published: the method and the parent's file digest, no version.
    unpublished = await run(*_package_args(child, data, tmp_path / "loose", "2"))
    assert unpublished.returncode == 0, unpublished.stderr
    doc = json.loads((tmp_path / "loose" / UNSIGNED_MANIFEST_FILE).read_text())
    assert doc["lineage"]["parent"] is None
    assert doc["lineage"]["method"] == "prune-structured-30%"
    assert doc["lineage"]["parent_sha256"] == sha256_file(parent)

    assert (await run(*_package_args(parent, data, tmp_path / "p1", "1"))).returncode == 0
    made = await run(*_package_args(child, data, tmp_path / "p2", "2", "--parent", "toy:1"))
    assert made.returncode == 0, made.stderr
    doc = json.loads((tmp_path / "p2" / UNSIGNED_MANIFEST_FILE).read_text())
    assert doc["lineage"] == {
        "parent": "toy:1",
        "method": "prune-structured-30%",
        "params": {"amount": 0.3, "finetune_epochs": 5},
        "parent_sha256": sha256_file(parent),
    }
    assert doc["evaluation"]["latency_p50_ms_b1"] == 0.02  # the sidecar's measurement
    assert doc["evaluation"]["parent_accuracy"] == 0.51
    assert doc["evaluation"]["throughput_b32"] > 0  # measured by package
    assert doc["evaluation"]["size_bytes"] == child.stat().st_size
    third = tmp_path / "third.onnx"
    third.write_bytes(onnx_model_bytes(2))
    made = await run(
        *_package_args(third, data, tmp_path / "p3", "3", "--parent", "toy:2", "--method", "x-1")
    )
    assert made.returncode == 0, made.stderr

    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        op = {"FOGLINE_CONTROL": cp.url, "FOGLINE_TOKEN": cp.tokens["operator"]}
        viewer = {"FOGLINE_CONTROL": cp.url, "FOGLINE_TOKEN": cp.tokens["viewer"]}
        # the parent is not published yet: a clear 4xx, nothing stored
        early = await run("model", "publish", "--package", str(tmp_path / "p2"), env=op)
        one_line(early, "HTTP 400", "toy:1 is not in the registry")
        async with ControlApi(cp.url, token=cp.tokens["operator"]) as api:
            await api.publish(tmp_path / "p1")
        done = await run("model", "publish", "--package", str(tmp_path / "p2"), env=op)
        assert done.returncode == 0, done.stderr
        async with ControlApi(cp.url, token=cp.tokens["operator"]) as api:
            await api.publish(tmp_path / "p3")

        listing = await run("model", "list", env=viewer)
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        assert lines[0].split()[:4] == ["NAME", "VERSION", "VARIANT", "PRECISION"]
        row2 = next(line for line in lines if line.startswith("toy") and " 2 " in line)
        assert "toy:1" in row2 and "prune-structured-30%" in row2

        shown = json.loads((await run("model", "show", "toy:2", "--json", env=viewer)).stdout)
        (v2,) = shown["versions"]
        assert v2["lineage"]["parent"] == "toy:1"
        assert v2["metrics"]["size_bytes"] == child.stat().st_size
        assert {f["role"] for f in v2["files"]} == {"model", "golden"}
        as_yaml = yaml.safe_load(
            (await run("model", "show", "toy", "-o", "yaml", env=viewer)).stdout
        )
        assert [v["version"] for v in as_yaml["versions"]] == ["1", "2", "3"]
        table = (await run("model", "show", "toy:2", env=viewer)).stdout
        assert "params: amount=0.3, finetune_epochs=5" in table and "model.onnx" in table

        tree = await run("model", "lineage", "toy:2", env=viewer)
        assert tree.returncode == 0, tree.stderr
        t = tree.stdout.splitlines()
        assert t[0].startswith("toy:1  train")
        assert t[1].startswith("└── toy:2  prune-structured-30%") and t[1].endswith("<")
        assert t[2].startswith("    └── toy:3  x-1")
        async with ControlApi(cp.url, token=cp.tokens["viewer"]) as api:
            whole = await api.get("/api/models/toy/lineage")
        assert [n["ref"] for n in whole["nodes"]] == ["toy:1", "toy:2", "toy:3"]
        assert whole["focus"] == ["toy:1", "toy:2", "toy:3"]

        one_line(await run("model", "show", "nope", env=viewer), "HTTP 404")
        one_line(await run("model", "lineage", "../x", env=viewer), "invalid model name")

        await _publish_attacks(cp, tmp_path / "p1")


async def _post(cp: ControlPlane, manifest: bytes, pkg: Path) -> tuple[int, str]:
    form = aiohttp.FormData()
    form.add_field("manifest", manifest.decode(), content_type="application/json")
    for name in ("model.onnx", "golden.npz"):
        form.add_field(name, (pkg / name).read_bytes(), filename=name)
    async with (
        aiohttp.ClientSession(headers=cp.auth("operator")) as s,
        s.post(f"{cp.url}/api/models", data=form) as resp,
    ):
        return resp.status, (await resp.json()).get("error", "")


async def _publish_attacks(cp: ControlPlane, pkg: Path) -> None:
    """Each attack is one 4xx with a reason, and leaves the registry as it was."""
    base = json.loads((pkg / UNSIGNED_MANIFEST_FILE).read_text())
    before = len(cp.registry.versions())

    def manifest(version: str, **changes: object) -> bytes:
        return json.dumps({**base, "version": version, **changes}).encode()

    other = cp.registry.model_versions("toy", "1")[0].manifest.file("model").sha256
    attacks = [
        (manifest("9", lineage={"parent": "../x", "method": "train"}), 400, "parent"),
        (manifest("9", lineage={"parent": "toy:404", "method": "distill"}), 400, "not in"),
        (manifest("9", lineage={"parent": "toy:9", "method": "train"}), 400, "not in"),
        (  # claims toy:2 as its parent but was made from toy:1's file
            manifest("9", lineage={"parent": "toy:2", "method": "distill", "parent_sha256": other}),
            400,
            "another model",
        ),
        (manifest("9", evaluation={"accuracy": float("nan")}), 400, "NaN"),
        (
            manifest("9", lineage={"method": "train", "params": {"p": "x" * 8000}}),
            400,
            "lineage param",
        ),
        (manifest("9", lineage={"method": "t", "params": {"p": "x" * 2 * 1024**2}}), 413, ""),
    ]
    for body, status, needle in attacks:
        got, error = await _post(cp, body, pkg)
        assert got == status, (got, error)
        assert needle in error, error
    assert len(cp.registry.versions()) == before


def test_package_lineage_flags_and_sidecar(tmp_path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(onnx_model_bytes(0))
    assert package_lineage(None, None, None).method == "train"
    with pytest.raises(InvalidInputError, match="--parent"):
        package_lineage("../x", "distill", None)
    with pytest.raises(InvalidInputError, match="--method"):
        package_lineage("toy:1", None, None)
    write_sidecar(model, Sidecar("int8-static-qdq", {"calibration": "minmax"}))
    sidecar = read_sidecar(model)
    assert sidecar is not None
    lineage = package_lineage("toy:1", "int8-search", sidecar)  # the flag wins
    assert (lineage.method, lineage.params) == ("int8-search", {"calibration": "minmax"})
    for bad in (
        '{"method": "x", "metrics": {"quality": NaN}}',
        '{"method": "x", "metrics": {"latency_p50_ms_b1": -1}}',
        '{"method": "x", "metrics": {"quality_metric": "vibes"}}',
        '{"method": "x/../y"}',
        '{"method": "x", "params": {"a": "' + "b" * 300 + '"}}',
        "[1]",
    ):
        sidecar_path(model).write_text(bad)
        with pytest.raises(InvalidInputError):
            read_sidecar(model)
    sidecar_path(model).write_text(" " * (65 * 1024))
    with pytest.raises(InvalidInputError, match="larger"):
        read_sidecar(model)
