"""``fogline model compress``: every method on a real exported CNN, the gate, the lineage sidecar.

The model is a small Conv + Gemm classifier exported by torch; its labels are
its own fp32 answers, so fp32 scores 100% and any loss is the compression's.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from cloud.pipeline.gate import QualityGate
from cloud.pipeline.model_data import save_model_data
from cloud.pipeline.quantize import DYNAMIC, STATIC, QuantConfig
from cloud.pipeline.sidecar import parse_sidecar, read_sidecar, sidecar_path
from common.errors import InvalidInputError
from common.manifest import sha256_file
from fogline.cli import main

ROWS = 128


def _data(rows: int = ROWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ten 8x8 class templates plus noise: a task a small CNN learns with clear margins,
    so that argmax flips measure the compression, not near-ties of an untrained model."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(42).standard_normal((10, 1, 8, 8)).astype(np.float32)
    classes = rng.integers(0, 10, rows)
    x = templates[classes] + 0.5 * rng.standard_normal((rows, 1, 8, 8)).astype(np.float32)
    return x.astype(np.float32), classes


def _export_cnn(path: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    x, y = (torch.from_numpy(a) for a in _data(1024, seed=1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):  # well under a second; loss near zero
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model = nn.Sequential(model, nn.Softmax(dim=-1)).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, still supported
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 1, 8, 8),), buf, dynamo=False, input_names=["x"],
            output_names=["p"], dynamic_axes={"x": {0: "n"}, "p": {0: "n"}},
        )  # fmt: skip
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(fp32 model, D.npz with labels, D.npz with a reference) for the CNN."""
    work = tmp_path_factory.mktemp("compression")
    fp32 = _export_cnn(work / "cnn.onnx")
    x, _ = _data()
    probs = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    labels = save_model_data(work / "labels.npz", {"x": x}, labels=probs.argmax(axis=1))
    reference = save_model_data(work / "ref.npz", {"x": x}, reference=probs)
    return fp32, labels, reference


def _compress(fp32: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["model", "compress", "--fp32", str(fp32), "--data", str(data),
                 "--out", str(out), *extra])  # fmt: skip


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *, says: str) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert says in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("int8-static-qdq", ["--calibration", "entropy"]),
        ("int8-static-qdq", ["--no-per-channel", "--calibration", "percentile"]),
        ("int8-dynamic", ["--exclude-op-type", "Gather"]),
        ("fp16", []),
    ],
)
def test_each_method_writes_a_gated_model_and_its_lineage(
    cnn: tuple[Path, Path, Path], tmp_path: Path, method: str, extra: list[str]
) -> None:
    fp32, labels, _ = cnn
    out = tmp_path / "c.onnx"
    assert _compress(fp32, labels, out, "--method", method, "--max-drop", "3", *extra) == 0
    record = read_sidecar(out)
    assert record is not None and record.method == method
    assert record.parent_sha256 == sha256_file(fp32)
    m = record.metrics
    assert record.quality_metric == "accuracy" and m["parent_quality"] == 1.0
    assert m["quality"] >= 0.97
    assert m["size_bytes"] == out.stat().st_size < fp32.stat().st_size
    assert m["latency_p50_ms_b1"] > 0 and m["throughput_b32"] > 0
    if method == "fp16":
        assert record.params == {"keep_io_types": True}
    else:
        assert record.params["per_channel"] == ("--no-per-channel" not in extra)
        assert ("Gather" in record.params["op_types_to_quantize"]) == (method != DYNAMIC)
    # The compressed model loads in ORT on the CPU, takes fp32 in, gives fp32 out.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.ones((2, 1, 8, 8), np.float32)
    got = session.run(None, {"x": x})[0]
    want = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want[0], atol=0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx", "c.onnx.compression.json"]


def test_search_prints_what_it_tried_and_keeps_the_fastest_that_passes(
    cnn: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fp32, labels, _ = cnn
    out = tmp_path / "s.onnx"
    assert _compress(fp32, labels, out, "--method", "search", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    rows = doc["search"]
    tried = {r["config"]: r for r in rows}
    assert len(tried) == len(rows) >= 4
    static = tried["static per-channel minmax"]
    # Other calibrations only where MinMax missed (same graph, same speed otherwise).
    assert ("static per-channel entropy" in tried) == (static["gate"] != "pass")
    assert not any("dynamic" in r["config"] and "Conv" in r["params"]["op_types_to_quantize"]
                   for r in rows)  # fmt: skip
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["gate"] == "pass"
    passed = [r for r in rows if r["gate"] == "pass"]
    assert chosen[0]["throughput"] == max(r["throughput"] for r in passed)
    assert all(r["throughput"] is None for r in rows if r["gate"] != "pass")
    record = read_sidecar(out)
    assert record is not None and record.to_dict() == doc["record"]
    assert record.params == chosen[0]["params"]
    # Piped (not a terminal): the same table as plain columns, and the caption.
    assert _compress(fp32, labels, tmp_path / "t.onnx", "--method", "search") == 0
    text = capsys.readouterr().out
    assert "configuration" in text and "* = kept" in text and "\x1b[" not in text


def test_a_model_that_misses_the_gate_says_by_how_much_and_writes_nothing(
    cnn: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fp32, _, reference = cnn
    out = tmp_path / "m.onnx"
    argv = ["model", "compress", "--fp32", str(fp32), "--data", str(reference), "--out", str(out)]
    line = _fails([*argv, "--min-cosine", "1.0"], capsys, says="below the 1 floor")
    assert re.search(
        r"int8-static-qdq model rejected: mean cosine (1|0\.9\d*) is [\d.e-]+ below the 1", line
    )
    capsys.readouterr()
    assert main([*argv, "--method", "search", "--min-cosine", "1.0"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("error:") == 1 and "error: none of the" in captured.err
    assert "below the 1 floor" in captured.err
    # The table of what was tried is still shown: down to single layers kept fp32 (the
    # last stage), none of them kept.
    assert "-1 nodes" in captured.out
    assert not [line for line in captured.out.splitlines() if line.startswith("*")]
    assert "static per-channel entropy" in captured.out
    assert list(tmp_path.iterdir()) == []  # no model, no sidecar, no scratch directory


def test_gate_messages_give_the_margin() -> None:
    gate = QualityGate(max_drop_points=1.0, min_cosine=0.99)
    assert gate.miss("accuracy", 0.97, 0.965) is None
    assert gate.miss("accuracy", 0.97, 0.95) == (
        "accuracy 95.00% vs parent 97.00% is a drop of 2.00 points, 1.00 more than the 1 allowed"
    )
    assert gate.miss("mean_cosine", 1.0, 0.992) is None
    assert gate.miss("mean_cosine", 1.0, 0.961) == "mean cosine 0.961 is 0.029 below the 0.99 floor"
    assert gate.miss("r2", 0.9, 0.85) is not None


def test_bad_input_is_one_error_line_and_nothing_written(
    cnn: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fp32, labels, _ = cnn
    base = ["model", "compress", "--fp32", str(fp32), "--data", str(labels)]
    out = ["--out", str(tmp_path / "o.onnx")]
    _fails([*base, *out, "--exclude-node", "../etc/passwd"], capsys, says="has no node(s) named")
    _fails([*base, *out, "--exclude-op-type", "Conv", "--exclude-op-type", "Gemm",
            "--exclude-op-type", "MatMul", "--exclude-op-type", "Gather"], capsys,
           says="nothing left to quantize")  # fmt: skip
    _fails([*base, "--out", str(fp32)], capsys, says="would overwrite the input model")
    _fails([*base, *out, "--method", "int8-dynamic", "--exclude-op-type", "Conv",
            "--exclude-op-type", "MatMul"], capsys,
           says="quantized no weight of this model")  # fmt: skip
    wrong = save_model_data(tmp_path / "w.npz", {"x": np.zeros((4, 64), np.float32)})
    _fails(["model", "compress", "--fp32", str(fp32), "--data", str(wrong), *out], capsys,
           says="has shape [4, 64]")  # fmt: skip
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"not onnx")
    _fails(["model", "compress", "--fp32", str(garbage), "--data", str(labels), *out], capsys,
           says="cannot load ONNX model")  # fmt: skip
    for flag, value in (("--min-cosine", "nan"), ("--max-drop", "-101"), ("--speed-batch", "0")):
        with pytest.raises(SystemExit):
            main([*base, *out, flag, value])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "w.npz"]


def test_quant_config_records_what_it_quantized() -> None:
    config = QuantConfig(STATIC, per_channel=False, calibration="entropy",
                         exclude_op_types=("Gemm",), exclude_nodes=("n1",))  # fmt: skip
    assert config.label() == "static per-tensor entropy -Gemm -1 nodes"
    assert config.params() == {
        "per_channel": False, "op_types_to_quantize": ["MatMul", "Conv", "Gather"],
        "nodes_to_exclude": ["n1"], "calibration": "entropy",
    }  # fmt: skip
    assert "calibration" not in QuantConfig(DYNAMIC).params()
    rounding = QuantConfig(DYNAMIC, reduce_range=True, weight_symmetric=False,
                           activation_symmetric=True)  # fmt: skip
    assert rounding.label() == "dynamic per-channel reduce-range asym-weights"
    assert rounding.params()["reduce_range"] is True
    assert rounding.params()["weight_symmetric"] is False
    assert "activation_symmetric" not in rounding.params()  # dynamic: activations are u8 asym
    # Attention / EmbedLayerNormalization exist only in fused graphs, and only dynamically.
    assert "Attention" in QuantConfig(DYNAMIC).quantized_op_types
    assert "Attention" not in QuantConfig(STATIC).quantized_op_types
    with pytest.raises(InvalidInputError, match="unknown calibration"):
        QuantConfig(calibration="magic")


def test_sidecar_round_trips_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    doc: dict[str, Any] = {
        "method": "int8-dynamic",
        "params": {"per_channel": True},
        "parent_sha256": "ab" * 32,
        "metrics": {"quality_metric": "mean_cosine", "quality": 0.992, "parent_quality": 1.0,
                    "size_bytes": 10, "latency_p50_ms_b1": 1.5, "throughput_b32": 100.0},
    }  # fmt: skip
    sidecar_path(model).write_text(json.dumps(doc))
    record = read_sidecar(model)
    assert record is not None and record.to_dict() == doc
    assert read_sidecar(tmp_path / "other.onnx") is None
    bad: Any
    for bad in (
        {**doc, "method": "../zip"},
        {**doc, "parent_sha256": "../../x"},
        {**doc, "metrics": {**doc["metrics"], "quality": float("nan")}},
        {**doc, "metrics": {**doc["metrics"], "quality_metric": "bleu"}},
        {k: v for k, v in doc.items() if k != "method"},
        [],
    ):
        with pytest.raises(InvalidInputError):
            parse_sidecar(bad)
