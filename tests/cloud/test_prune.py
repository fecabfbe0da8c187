"""Pruning: structured pruning really removes units (a smaller ONNX file that ONNX Runtime
loads, with a dynamic batch) and passes the gate; unstructured pruning is reported for what
it is; a model that misses the gate leaves nothing behind."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from cloud.pipeline import digits
from cloud.pipeline.data import load_digits_split
from cloud.pipeline.derive import EvalRows, GateError, Spec, prune_job
from cloud.pipeline.export import export_onnx
from cloud.pipeline.onnx_model import run_outputs
from cloud.pipeline.prune import (
    _keep,
    load_onnx_weights,
    prune_structured,
    sequential_of,
    sparsity,
)
from cloud.pipeline.sidecar import read_sidecar
from cloud.pipeline.train import train_model
from cloud.pipeline.zoo import entry
from common.errors import InvalidInputError
from common.manifest import sha256_file
from tests.fogline_cli import fogline
from tests.model_fixtures import onnx_model_bytes


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A digits edge MLP, briefly trained, as its ONNX file; and the test rows."""
    split = load_digits_split(digits.DATA_SEED)
    path = tmp_path_factory.mktemp("parent") / "edge.onnx"
    export_onnx(train_model("edge", split, epochs=8, seed=0), path)
    return path, EvalRows({"input": split.x_test}, split.y_test, "digits test split")


def _spec() -> Spec:
    e = entry("digits-edge")
    return Spec(e.model, e.dataset, e.recipe, "digits-edge")


def test_structured_pruning_shrinks_the_onnx_file_and_passes_the_gate(parent, tmp_path) -> None:
    path, rows = parent
    out = tmp_path / "pruned.onnx"
    report = prune_job(path, _spec(), rows, out, kind="structured", amount=0.3, finetune_epochs=2)
    assert report["method"] == "prune-structured-30%"
    assert out.stat().st_size < 0.75 * path.stat().st_size
    assert report["drop_points"] <= 1.0
    for batch in (1, 7):  # dynamic batch, loads and runs in ONNX Runtime
        (probs,) = run_outputs(out, {"input": rows.inputs["input"][:batch]}).values()
        assert probs.shape == (batch, 10)
    accuracy = float(
        (run_outputs(out, rows.inputs)["probabilities"].argmax(1) == rows.labels).mean()
    )
    assert accuracy == pytest.approx(report["accuracy"])
    sidecar = read_sidecar(out)
    assert sidecar is not None and sidecar.method == "prune-structured-30%"
    assert sidecar.parent_sha256 == sha256_file(path)
    assert sidecar.params["parameters"] < sidecar.params["parent_parameters"]
    # the pruned file loads back into its (unpruned) architecture, resized
    reloaded = load_onnx_weights(digits.edge_model(), out)
    assert sequential_of(reloaded)[0].out_features == round(128 * 0.7)


@pytest.mark.parametrize("factory", [digits.edge_model, digits.cloud_model])
def test_structured_pruning_keeps_exactly_the_surviving_units(factory) -> None:
    """The pruned model answers as the original with the removed units zeroed: the
    channel-to-feature bookkeeping (conv -> flatten -> linear included) is right."""
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.rand(5, 64) * 16

    masked = factory().eval()
    masked.load_state_dict(model.state_dict())
    masked_body = sequential_of(masked)
    weighted = [i for i, m in enumerate(masked_body) if hasattr(m, "weight")]
    for i, nxt in itertools.pairwise(weighted):  # zero what pruning drops
        layer, after = masked_body[i], masked_body[nxt]
        dropped = torch.ones(layer.weight.shape[0], dtype=torch.bool)
        dropped[_keep(layer, 0.5)] = False
        per_unit = after.weight.shape[1] // layer.weight.shape[0]  # >1: conv -> flatten
        with torch.no_grad():
            layer.weight[dropped] = 0
            layer.bias[dropped] = 0
            # the inputs they fed carry zeros now; zeroed, the next layer ranks as pruned
            after.weight[:, dropped.repeat_interleave(per_unit)] = 0
    prune_structured(model, 0.5)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-6)


def test_unstructured_pruning_is_reported_for_what_it_buys(parent, tmp_path) -> None:
    path, rows = parent
    out = tmp_path / "sparse.onnx"
    report = prune_job(path, _spec(), rows, out, kind="unstructured", amount=0.6, finetune_epochs=1)
    assert report["params"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    # dense tensors: the file is as large as before, only its deflated size shrinks
    assert abs(report["bytes"] - report["parent_bytes"]) < 0.02 * report["parent_bytes"]
    assert report["zlib_bytes"] < 0.8 * report["parent_zlib_bytes"]
    weights = load_onnx_weights(digits.edge_model(), out)
    assert sparsity(weights) == pytest.approx(0.6, abs=1e-3)


def test_a_model_that_misses_the_gate_is_not_written(parent, tmp_path) -> None:
    path, rows = parent
    out = tmp_path / "gone.onnx"
    with pytest.raises(GateError, match=r"drop of .* points, .* more than the -50 allowed"):
        prune_job(
            path, _spec(), rows, out, kind="structured", amount=0.3, finetune_epochs=0,
            max_drop=-50.0,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_parent_of_another_architecture_is_one_clear_error(tmp_path) -> None:
    toy = tmp_path / "toy.onnx"
    toy.write_bytes(onnx_model_bytes(0))  # not a digits-edge export
    with pytest.raises(InvalidInputError, match="not exported from this architecture"):
        load_onnx_weights(digits.edge_model(), toy)
    result = fogline("model", "prune", "--model", str(toy), "--out", str(tmp_path / "o.onnx"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    bad = fogline("model", "prune", "--model", str(toy), "--amount", "1.5", "--out", "x.onnx")
    assert bad.returncode == 1 and "error:" in bad.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
def test_the_report_is_json_from_the_cli(parent, tmp_path) -> None:
    path, _ = parent
    out = tmp_path / "p.onnx"
    result = fogline(
        "model", "prune", "--model", str(path), "--amount", "0.25", "--finetune-epochs", "1",
        "--out", str(out), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "prune-structured-25%" and report["bytes"] == out.stat().st_size
    assert np.isfinite(report["latency_p50_ms_b1"])
