"""The model pipeline on real data: train, export, quantize, package, CLI.

Everything is real (torch training, ONNX export, ORT quantization and
sessions); the edge model is trained once per module with fewer epochs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.pipeline import cli
from cloud.pipeline.compress import AccuracyDropError, CompressionReport, compress, evaluate
from cloud.pipeline.data import Split, load_digits_split
from cloud.pipeline.export import export_onnx
from cloud.pipeline.onnx_model import has_external_data, predict
from cloud.pipeline.package import build_package, calibrate_routing
from cloud.pipeline.train import train_model
from common.errors import InvalidInputError
from common.golden import compare, load_golden
from common.manifest import (
    UNSIGNED_MANIFEST_FILE,
    Manifest,
    RoutingHints,
    TensorSpec,
    sha256_file,
)
from common.onnx_runtime import describe_onnx_io
from kernels.uncertainty import score

EDGE_EPOCHS = 25


@dataclass(frozen=True)
class Trained:
    split: Split
    model: torch.nn.Module
    fp32: Path
    int8: Path
    report: CompressionReport


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    split = load_digits_split()
    model = train_model("edge", split, epochs=EDGE_EPOCHS)
    work = tmp_path_factory.mktemp("pipeline")
    fp32 = export_onnx(model, work / "edge.fp32.onnx")
    report = compress(fp32, work / "edge.int8.onnx", split)
    return Trained(split, model, fp32, work / "edge.int8.onnx", report)


def test_split_is_stratified_and_deterministic() -> None:
    a, b = load_digits_split(), load_digits_split()
    assert [len(a.y_train), len(a.y_val), len(a.y_test)] == [1078, 359, 360]
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.x_train.shape[1] == 64 and a.x_train.max() == 16.0
    np.testing.assert_array_equal(a.x_test, b.x_test)
    for y in (a.y_train, a.y_val, a.y_test):  # every class present in each part
        assert set(np.unique(y)) == set(range(10))
    assert not np.array_equal(load_digits_split(seed=1).y_test, a.y_test)


class _Recorder:
    """A Progress that remembers what the loop told it."""

    def __init__(self) -> None:
        self.started: tuple[int, int, int] | None = None
        self.steps = 0
        self.epochs: list[tuple[int, int, float, str]] = []
        self.closed = False

    def start(self, total_steps: int, epochs: int, done_steps: int = 0) -> None:
        self.started = (total_steps, epochs, done_steps)

    def step(self, steps: int, samples: int, loss: float) -> None:
        self.steps += steps

    def epoch_end(self, epoch: int, epochs: int, loss: float, val: str) -> None:
        self.epochs.append((epoch, epochs, loss, val))

    def close(self) -> None:
        self.closed = True


def test_training_is_deterministic_and_reports_progress() -> None:
    split = load_digits_split()
    seen = _Recorder()
    first = train_model("edge", split, epochs=2, seed=3, progress=seen)
    second = train_model("edge", split, epochs=2, seed=3)
    for p, q in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    assert seen.started == (34, 2, 0) and seen.steps == 34 and seen.closed  # 1078 rows / 64
    assert [e[:2] for e in seen.epochs] == [(1, 2), (2, 2)]
    assert all(loss > 0 and val.startswith("val acc ") for _, _, loss, val in seen.epochs)


def test_bad_arguments_are_refused() -> None:
    split = load_digits_split()
    with pytest.raises(InvalidInputError):
        train_model("tiny", split)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        train_model("edge", split, epochs=0)


def test_exported_model_signature_and_outputs(trained: Trained) -> None:
    inputs, outputs = describe_onnx_io(trained.fp32)
    assert inputs == [TensorSpec("input", "FP32", [-1, 64])]
    assert outputs == [TensorSpec("probabilities", "FP32", [-1, 10])]
    import onnx

    assert not has_external_data(onnx.load(str(trained.fp32)))
    x = trained.split.x_test[:17]  # raw pixels: the graph scales them itself
    probs = predict(trained.fp32, x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        expected = trained.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_int8_is_smaller_and_as_accurate(trained: Trained) -> None:
    r = trained.report
    assert r.fp32_bytes == trained.fp32.stat().st_size
    assert r.int8_bytes == trained.int8.stat().st_size
    assert r.int8_bytes < 0.6 * r.fp32_bytes
    assert r.fp32_accuracy > 0.93 and r.int8_accuracy > 0.93
    assert r.drop_points <= 1.0
    assert r.int8_accuracy == evaluate(trained.int8, trained.split.x_test, trained.split.y_test)
    assert describe_onnx_io(trained.int8) == describe_onnx_io(trained.fp32)


def test_accuracy_drop_error_carries_the_report(trained: Trained, tmp_path: Path) -> None:
    with pytest.raises(AccuracyDropError) as info:
        compress(trained.fp32, tmp_path / "int8.onnx", trained.split, max_drop_points=-100)
    assert isinstance(info.value, ValueError)
    assert info.value.report.int8_bytes == (tmp_path / "int8.onnx").stat().st_size
    assert "at most -100 allowed" in str(info.value)


def test_build_package_matches_disk_and_golden_reproduces(trained: Trained, tmp_path: Path) -> None:
    rows = trained.split.x_test[:8]
    manifest = build_package(
        trained.int8,
        tmp_path / "pkg",
        name="digits",
        version="1",
        release=1,
        variant="edge",
        precision="int8",
        golden_rows=rows,
        evaluation={"accuracy": trained.report.int8_accuracy},
        routing=RoutingHints(uncertainty_threshold=0.2, max_local_batch=8),
        parent="0",
    )
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert [(f.name, f.role) for f in manifest.files] == [
        ("model.onnx", "model"),
        ("golden.npz", "golden"),
    ]
    for f in manifest.files:
        path = tmp_path / "pkg" / f.name
        assert (f.size, f.sha256) == (path.stat().st_size, sha256_file(path))
    assert manifest.inputs == [TensorSpec("input", "FP32", [-1, 64])]
    assert manifest.created_at.endswith("+00:00")
    inputs, outputs = load_golden(tmp_path / "pkg" / "golden.npz")
    np.testing.assert_array_equal(inputs["input"], rows)
    actual = {"probabilities": predict(tmp_path / "pkg" / "model.onnx", inputs["input"])}
    compare(outputs, actual, atol=1e-6)


@pytest.mark.parametrize("fraction", [0.05, 0.15, 0.3])
def test_calibrate_routing_escalates_the_asked_fraction(trained: Trained, fraction: float) -> None:
    x_val = trained.split.x_val
    hints = calibrate_routing(trained.fp32, x_val, escalate_fraction=fraction, max_local_batch=4)
    assert hints.uncertainty_metric == "max_prob" and hints.max_local_batch == 4
    scores = score("max_prob", predict(trained.fp32, x_val))
    escalated = float((scores > hints.uncertainty_threshold).mean())
    assert abs(escalated - fraction) <= 0.02


def test_calibrate_routing_refuses_bad_arguments(trained: Trained) -> None:
    x_val = trained.split.x_val
    with pytest.raises(InvalidInputError):
        calibrate_routing(trained.fp32, x_val, metric="vibes")
    with pytest.raises(InvalidInputError):
        calibrate_routing(trained.fp32, x_val, escalate_fraction=1.5)


def test_cloud_cnn_exports_and_quantizes(tmp_path: Path) -> None:
    split = load_digits_split()
    fp32 = export_onnx(train_model("cloud", split, epochs=4), tmp_path / "cloud.onnx")
    report = compress(fp32, tmp_path / "cloud.int8.onnx", split, max_drop_points=100)
    assert report.int8_bytes < 0.5 * report.fp32_bytes
    assert report.fp32_accuracy > 0.9 and report.int8_accuracy > 0.9


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fogline model")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_train_compress_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp32, int8, pkg = tmp_path / "m.onnx", tmp_path / "m.int8.onnx", tmp_path / "pkg"
    assert _run(["train", "--kind", "edge", "--out", str(fp32), "--epochs", "15"]) == 0
    err = capsys.readouterr().err
    assert "training digits-edge" in err and "epoch 15/15" in err
    assert _run(["compress", "--fp32", str(fp32), "--out", str(int8)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "bytes" in out and "size ratio" in out
    argv = ["package", "--model", str(int8), "--out", str(pkg), "--name", "digits"]
    argv += ["--version", "1", "--release", "1", "--variant", "edge", "--precision", "int8"]
    assert _run([*argv, "--escalate-fraction", "0.2", "--max-local-batch", "4"]) == 0
    doc = json.loads((pkg / UNSIGNED_MANIFEST_FILE).read_text())
    manifest = Manifest.from_dict(doc)
    assert (manifest.name, manifest.variant, manifest.precision) == ("digits", "edge", "int8")
    assert manifest.routing.max_local_batch == 4
    assert manifest.evaluation["accuracy"] > 0.9  # the one name: `control models` shows it
    assert sha256_file(pkg / "model.onnx") == sha256_file(int8)


def test_cli_compress_rejects_an_accuracy_drop(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["compress", "--fp32", str(trained.fp32), "--out", str(tmp_path / "x.onnx")]
    assert _run([*argv, "--max-drop", "-100"]) == 1  # demands a 100-point gain
    err = capsys.readouterr().err
    assert "error: int8-static-qdq model rejected: accuracy" in err
    assert "is a drop of" in err and "more than the -100 allowed" in err  # by how much
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_help_and_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("train", "compress", "package"):
        with pytest.raises(SystemExit) as info:
            _parser().parse_args([command, "--help"])
        assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["compress", "--fp32", "/nonexistent.onnx", "--out", "x.onnx"])
    assert info.value.code == 2
    assert "no such file" in capsys.readouterr().err
