"""Your own model through the real CLI: train (--factory), compress and package (--data).

A two-input classifier defined in ``tests/cloud/factory_models.py`` goes the
whole way an operator's model would, and the package is then loaded and
self-tested the way an agent does it. Bad input of every kind ends in one
``error:`` line, exit 1, and nothing written.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from common.golden import compare, load_golden
from common.inference import InferRequest, Tensor
from common.manifest import UNSIGNED_MANIFEST_FILE, Manifest, TensorSpec, sha256_file
from common.onnx_runtime import OnnxRuntime, check_inputs, describe_onnx_io
from fogline.cli import main

MODELS = "tests.cloud.factory_models"
# NOTE: per-channel int8 weights (static or dynamic, Gemm or MatMul) cost this 4- and
# 3-input MLP ~10 points of cosine under onnxruntime 1.32.0 while per-tensor keeps 0.995;
# the gate refuses such a model (tested in test_per_channel_loss_is_refused_by_the_gate).
# A 16-unit MLP also loses up to 2 points of accuracy to int8 activations: a looser budget
# for the tests that are about the pipeline, not the quantizer.
PER_TENSOR = ("--no-per-channel", "--max-drop", "3")


@dataclass(frozen=True)
class TwoInput:
    fp32: Path
    data: Path
    metrics: dict


@pytest.fixture(scope="module")
def two_input(tmp_path_factory: pytest.TempPathFactory) -> TwoInput:
    """Trained once through ``fogline model train --factory/--dataset``."""
    work = tmp_path_factory.mktemp("factory")
    fp32, data, metrics = work / "m.onnx", work / "d.npz", work / "metrics.json"
    argv = ["model", "train", "--factory", f"{MODELS}:make_model"]
    argv += ["--dataset", f"{MODELS}:make_dataset", "--out", str(fp32), "--epochs", "12"]
    argv += ["--data-out", str(data), "--metrics-out", str(metrics), "--lr", "0.01"]
    assert main(argv) == 0
    return TwoInput(fp32, data, json.loads(metrics.read_text()))


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *, says: str) -> None:
    """Exit 1 with one error line, saying ``says``, and no traceback."""
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert says in errors[0], errors[0]
    assert "Traceback" not in err


def test_train_exports_the_models_own_signature(two_input: TwoInput) -> None:
    inputs, outputs = describe_onnx_io(two_input.fp32)
    assert inputs == [TensorSpec("a", "FP32", [-1, 4]), TensorSpec("b", "FP32", [-1, 3])]
    assert outputs == [TensorSpec("score", "FP32", [-1, 3])]
    m = two_input.metrics
    assert m["val_accuracy"] > 0.85 and m["onnx_val_accuracy"] == pytest.approx(
        m["val_accuracy"], abs=0.01
    )
    with np.load(two_input.data) as d:
        assert sorted(d.files) == ["a", "b", "labels"]
        assert d["a"].shape == (300, 4) and d["b"].dtype == np.float32
        assert d["labels"].dtype == np.int64


def test_compress_package_and_self_test_like_an_agent(
    two_input: TwoInput, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    int8, pkg = tmp_path / "m8.onnx", tmp_path / "pkg"
    data = str(two_input.data)
    assert main(["model", "compress", "--fp32", str(two_input.fp32), "--data", data,
                 "--out", str(int8), *PER_TENSOR]) == 0  # fmt: skip
    assert "test accuracy" in capsys.readouterr().out
    argv = ["model", "package", "--model", str(int8), "--data", data, "--name", "pair"]
    argv += ["--version", "1", "--release", "1", "--variant", "edge", "--precision", "int8"]
    assert main([*argv, "--out", str(pkg)]) == 0
    manifest = Manifest.from_dict(json.loads((pkg / UNSIGNED_MANIFEST_FILE).read_text()))
    assert manifest.inputs == [TensorSpec("a", "FP32", [-1, 4]), TensorSpec("b", "FP32", [-1, 3])]
    assert manifest.outputs == [TensorSpec("score", "FP32", [-1, 3])]
    assert manifest.task == "classification" and manifest.evaluation["accuracy"] > 0.8
    assert 0.0 < manifest.routing.uncertainty_threshold < 1.0
    assert manifest.routing.max_local_batch >= 1
    assert sha256_file(pkg / "model.onnx") == sha256_file(int8)
    # What an agent does before activating a slot: load, run the golden inputs, compare.
    runtime = OnnxRuntime(pkg / "model.onnx", manifest)
    asyncio.run(runtime.load())
    inputs, expected = load_golden(pkg / "golden.npz")
    assert sorted(inputs) == ["a", "b"] and len(inputs["a"]) == 8
    outputs = runtime.infer_sync(inputs, list(expected))
    compare(expected, {t.name: t.data for t in outputs})
    request = InferRequest("pair", [Tensor("a", inputs["a"]), Tensor("b", inputs["b"])])
    feeds = check_inputs(request, manifest.inputs)
    np.testing.assert_allclose(runtime.infer_sync(feeds, None)[0].data, expected["score"])


def test_reference_data_scores_by_cosine_and_max_local_batch_is_explicit(
    two_input: TwoInput, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without labels: quality is mean cosine to the reference; no uncertainty escalation."""
    from cloud.pipeline.onnx_model import run_outputs

    with np.load(two_input.data) as d:
        feeds = {"a": d["a"], "b": d["b"]}
    ref = tmp_path / "ref.npz"
    np.savez(ref, **feeds, reference=run_outputs(two_input.fp32, feeds)["score"])
    int8 = tmp_path / "m8.onnx"
    argv = ["model", "compress", "--fp32", str(two_input.fp32), "--data", str(ref), *PER_TENSOR]
    assert main([*argv, "--out", str(int8)]) == 0
    out = capsys.readouterr().out
    assert "mean cosine" in out and "100.00%" in out  # fp32 reproduces its own reference
    argv = ["model", "package", "--model", str(int8), "--data", str(ref), "--name", "pair"]
    argv += ["--version", "2", "--release", "2", "--variant", "edge", "--precision", "int8"]
    assert main([*argv, "--max-local-batch", "16", "--out", str(tmp_path / "pkg")]) == 0
    manifest = Manifest.from_dict(
        json.loads((tmp_path / "pkg" / UNSIGNED_MANIFEST_FILE).read_text())
    )
    assert manifest.routing.max_local_batch == 16
    assert manifest.evaluation["mean_cosine"] > 0.99


def _bad_npz(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


def _rows(n: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a": rng.standard_normal((n, 4)).astype(np.float32),
        "b": rng.standard_normal((n, 3)).astype(np.float32),
    }


@pytest.mark.parametrize(
    ("arrays", "says"),
    [
        ({"a": _rows()["a"]}, "no array for model input(s) ['b']"),
        ({**_rows(), "a": _rows()["a"].astype(np.float64)}, "is float64, but the model takes FP32"),
        ({**_rows(), "a": np.zeros((10, 5), np.float32)}, "has shape [10, 5], the model takes"),
        (_rows(0), "no rows (an empty calibration set)"),
        ({**_rows(), "extra": np.zeros(10)}, "neither model inputs"),
        ({**_rows(), "labels": np.zeros(9, np.int64)}, "different numbers of rows"),
    ],
    ids=["missing-input", "wrong-dtype", "wrong-shape", "empty", "unknown-key", "ragged"],
)
def test_bad_data_is_one_error_line_and_writes_nothing(
    two_input: TwoInput,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arrays: dict[str, np.ndarray],
    says: str,
) -> None:
    data = _bad_npz(tmp_path, **arrays)
    out = tmp_path / "m8.onnx"
    _fails(["model", "compress", "--fp32", str(two_input.fp32), "--data", data,
            "--out", str(out)], capsys, says=says)  # fmt: skip
    argv = ["model", "package", "--model", str(two_input.fp32), "--data", data, "--name", "x"]
    argv += ["--version", "1", "--release", "1", "--variant", "edge", "--precision", "fp32"]
    _fails([*argv, "--out", str(tmp_path / "pkg")], capsys, says=says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def test_without_data_only_a_digits_model_is_accepted(
    two_input: TwoInput, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fp32 = str(two_input.fp32)
    out = str(tmp_path / "o")
    _fails(["model", "compress", "--fp32", fp32, "--out", out], capsys, says="give its rows with")
    argv = ["model", "package", "--model", fp32, "--out", out, "--name", "x", "--version", "1"]
    argv += ["--release", "1", "--variant", "edge", "--precision", "fp32"]
    _fails(argv, capsys, says="not digits (one FP32 [N, 64] input)")
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_does_not_load_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not a protobuf")
    data = _bad_npz(tmp_path, **_rows())
    for command in (["compress", "--fp32"], ["package", "--model"]):
        argv = ["model", *command, str(broken), "--data", data, "--out", str(tmp_path / "o")]
        if command[0] == "package":
            argv += ["--name", "x", "--version", "1", "--release", "1", "--variant", "edge"]
            argv += ["--precision", "fp32"]
        _fails(argv, capsys, says="cannot load ONNX model")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("factory", "dataset", "says"),
    [
        ("raising_model", "make_dataset", "raised RuntimeError: weights file not found"),
        ("not_a_module", "make_dataset", "returned dict, not a torch.nn.Module"),
        ("make_model", "not_training_data", "not cloud.pipeline.factory.TrainingData"),
        ("make_model", "empty_dataset", "the train split is empty"),
        ("make_model", "no_such_function", "has no 'no_such_function'"),
        ("wrong_width_model", "make_dataset", "cannot take inputs ['a', 'b']: RuntimeError"),
    ],
)
def test_bad_factories_are_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], factory: str, dataset: str, says: str
) -> None:
    out = tmp_path / "m.onnx"
    argv = ["model", "train", "--factory", f"{MODELS}:{factory}"]
    _fails([*argv, "--dataset", f"{MODELS}:{dataset}", "--out", str(out)], capsys, says=says)
    assert not out.exists()


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("tests.cloud.factory_models", "is not of the form pkg.module:name"),
        ("tests/cloud/factory_models.py:make_model", "is not of the form pkg.module:name"),
        ("no_such_package.models:make", "cannot import no_such_package.models"),
    ],
)
def test_bad_specs_are_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, says: str
) -> None:
    argv = ["model", "train", "--factory", spec, "--dataset", f"{MODELS}:make_dataset"]
    _fails([*argv, "--out", str(tmp_path / "m.onnx")], capsys, says=says)
    assert list(tmp_path.iterdir()) == []


def test_factory_and_zoo_arguments_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path / "m.onnx")]
    _fails(["model", "train", "--factory", f"{MODELS}:make_model", *out], capsys, says="together")
    _fails(["model", "train", *out], capsys, says="say what to train")
    _fails(["model", "train", "--model", "digits-edge", "--resume", *out], capsys, says="--resume")


@pytest.mark.parametrize(
    ("latency_ms", "budget", "expected"),
    [
        ({1: 0.1, 2: 0.2, 4: 0.5, 8: 1.2}, 1.0, 4),
        ({1: 0.1, 2: 0.2, 4: 0.5}, 10.0, 4),  # all within: the largest measured
        ({1: 3.0, 2: 4.0}, 1.0, 1),  # even one row is over: still serve one locally
        ({1: 0.1, 2: 2.0, 4: 0.9}, 1.0, 1),  # stop at the first over budget, ignore a dip
    ],
)
def test_largest_local_batch_from_measured_latency(
    latency_ms: dict[int, float], budget: float, expected: int
) -> None:
    from cloud.pipeline.routing import largest_within

    assert largest_within(latency_ms, budget) == expected


def test_only_a_softmax_output_gets_an_uncertainty_threshold() -> None:
    from cloud.pipeline.routing import looks_like_probabilities

    probs = np.array([[0.2, 0.8], [0.5, 0.5]], np.float32)
    assert looks_like_probabilities(probs)
    assert not looks_like_probabilities(np.array([[2.0, -1.0], [0.5, 0.5]], np.float32))
    assert not looks_like_probabilities(np.ones((2, 1), np.float32))  # one column
    assert not looks_like_probabilities(np.zeros((0, 3), np.float32))


def test_the_model_cli_stays_torch_free_at_import() -> None:
    import subprocess
    import sys

    code = "import sys, cloud.pipeline.cli; print(sorted(m for m in sys.modules if m in "
    code += "('torch', 'onnx', 'onnxruntime', 'sklearn', 'rich')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _identity_model(path: Path, elem_type: int) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem_type, ["batch", 2])],
        [helper.make_tensor_value_info("y", elem_type, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_signature_maps_onnx_types_to_v2_and_refuses_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnx import TensorProto

    from common.errors import InvalidInputError

    for elem, v2 in [(TensorProto.INT16, "INT16"), (TensorProto.UINT32, "UINT32")]:
        inputs, outputs = describe_onnx_io(_identity_model(tmp_path / f"{v2}.onnx", elem))
        assert inputs == [TensorSpec("x", v2, [-1, 2])] and outputs[0].datatype == v2
    strings = _identity_model(tmp_path / "s.onnx", TensorProto.STRING)
    with pytest.raises(InvalidInputError, match="tensor\\(string\\), which Fogline cannot serve"):
        describe_onnx_io(strings)
    data = _bad_npz(tmp_path, x=np.zeros((2, 2), np.int16))
    argv = ["model", "compress", "--fp32", str(strings), "--data", data]
    _fails([*argv, "--out", str(tmp_path / "o.onnx")], capsys, says="cannot serve")


def test_regression_with_a_sequence_axis_exports_dynamic_and_chains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Float targets train with MSE; --data-out writes them as 'reference' for compress."""
    from cloud.pipeline.onnx_model import run_outputs

    fp32, data = tmp_path / "seq.onnx", tmp_path / "seq.npz"
    argv = ["model", "train", "--factory", f"{MODELS}:make_sequence_model", "--dataset"]
    argv += [f"{MODELS}:make_sequence_dataset", "--epochs", "30", "--lr", "0.05"]
    assert main([*argv, "--out", str(fp32), "--data-out", str(data)]) == 0
    assert "val loss" in capsys.readouterr().out
    inputs, outputs = describe_onnx_io(fp32)
    assert inputs == [TensorSpec("tokens", "FP32", [-1, -1, 2])]
    assert outputs == [TensorSpec("value", "FP32", [-1, 1])]
    for length in (3, 11):  # any sequence length runs
        x = np.ones((2, length, 2), np.float32)
        assert run_outputs(fp32, {"tokens": x})["value"].shape == (2, 1)
    with np.load(data) as d:
        assert sorted(d.files) == ["reference", "tokens"]
    argv = ["model", "compress", "--fp32", str(fp32), "--data", str(data), "--max-drop", "5"]
    assert main([*argv, "--out", str(tmp_path / "seq8.onnx")]) == 0
    out = capsys.readouterr().out
    assert "\nr2 " in out  # one number per row: judged by R², not by a cosine of signs
    # Not class probabilities: the package tells the router there is nothing to score.
    argv = ["model", "package", "--model", str(fp32), "--data", str(data), "--name", "seq"]
    argv += ["--version", "1", "--release", "1", "--variant", "edge", "--precision", "fp32"]
    assert main([*argv, "--max-local-batch", "4", "--out", str(tmp_path / "pkg")]) == 0
    manifest = Manifest.from_dict(
        json.loads((tmp_path / "pkg" / UNSIGNED_MANIFEST_FILE).read_text())
    )
    assert manifest.routing.uncertainty_metric == "none"


def test_per_channel_loss_is_refused_by_the_gate(
    two_input: TwoInput, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever the runtime does to a configuration, what misses the gate is not written;
    the search then keeps one that passes."""
    out = tmp_path / "m8.onnx"
    argv = ["model", "compress", "--fp32", str(two_input.fp32), "--data", str(two_input.data)]
    capsys.readouterr()
    code = main([*argv, "--out", str(out), "--max-drop", "1"])
    err = capsys.readouterr().err
    assert code == 0 or ("rejected" in err and not out.exists()), err
    assert main([*argv, "--out", str(out), "--method", "search", "--max-drop", "1"]) == 0
    assert out.exists()
