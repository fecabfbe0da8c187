"""Build real, signed model packages for tests: a small torch classifier exported to ONNX.

A plain helper module (not a conftest): ``from tests.model_fixtures import make_package``.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.golden import GOLDEN_FILE, save_golden
from common.manifest import (
    Manifest,
    RoutingHints,
    SignedManifest,
    TensorSpec,
    file_entry,
    write_package,
)
from common.signing import Signer

IN_FEATURES = 64
CLASSES = 10
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class Package:
    directory: Path
    signed: SignedManifest
    signer: Signer

    @property
    def manifest(self) -> Manifest:
        return self.signed.manifest

    @property
    def model_path(self) -> Path:
        return self.directory / self.manifest.file("model").name


@functools.lru_cache(maxsize=8)
def onnx_model_bytes(seed: int = 0) -> bytes:
    """Linear(64,16) → ReLU → Linear(16,10) → Softmax, exported with a dynamic batch."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(IN_FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES), nn.Softmax(dim=-1)
    ).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, still supported
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, IN_FEATURES),),
            buf,
            dynamo=False,
            input_names=["input"],
            output_names=["probabilities"],
            dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
        )
    return buf.getvalue()


def slow_model_bytes(layers: int, width: int = 512, seed: int = 0) -> bytes:
    """The toy's input and output with ``layers`` MatMul+Tanh steps of ``width`` between,
    as one ONNX Loop: genuinely slow in proportion to ``layers``, one weight in memory."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def weight(name: str, rows: int, cols: int) -> onnx.TensorProto:
        w = (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)
        return numpy_helper.from_array(w, name)

    float_h = ["batch", width]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["h_out"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, float_h),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, float_h),
        ],
    )
    trips = numpy_helper.from_array(np.array(layers, dtype=np.int64), "trips")
    go = numpy_helper.from_array(np.array(True), "go")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w_in"], ["h0"]),
            helper.make_node("Loop", ["trips", "go", "h0"], ["h"], body=body),
            helper.make_node("MatMul", ["h", "w_out"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", IN_FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        [
            weight("w_in", IN_FEATURES, width),
            weight("w", width, width),
            weight("w_out", width, CLASSES),
            trips,
            go,
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def toy_input(rows: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, IN_FEATURES)).astype(np.float32)


def reference_output(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": x})[0]


def make_package(
    directory: Path,
    *,
    name: str = "toy",
    version: str = "1",
    release: int = 1,
    variant: str = "edge",
    seed: int = 0,
    routing: RoutingHints | None = None,
    signer: Signer | None = None,
    model_bytes: bytes | None = None,
) -> Package:
    """Write a signed package (model.onnx, golden.npz, manifest.json) into ``directory``.

    ``model_bytes``: another ONNX model with the toy's input and output (default: the toy).
    """
    directory.mkdir(parents=True, exist_ok=True)
    signer = signer or Signer.generate()
    model_path = directory / MODEL_FILE
    model_path.write_bytes(model_bytes or onnx_model_bytes(seed))
    x = toy_input(4)
    save_golden(
        directory / GOLDEN_FILE, {"input": x}, {"probabilities": reference_output(model_path, x)}
    )
    manifest = Manifest(
        name=name,
        version=version,
        release=release,
        variant=variant,
        task="classification",
        format="onnx",
        precision="fp32",
        files=[file_entry(model_path, "model"), file_entry(directory / GOLDEN_FILE, "golden")],
        inputs=[TensorSpec("input", "FP32", [-1, IN_FEATURES])],
        outputs=[TensorSpec("probabilities", "FP32", [-1, CLASSES])],
        routing=routing or RoutingHints(),
    )
    signed = SignedManifest.sign(manifest, signer)
    write_package(directory, signed)
    return Package(directory, signed, signer)


def v2_infer_body(rows: int = 1, **parameters: object) -> dict:
    """A V2 JSON infer request for the toy model, as a plain REST client writes it."""
    body: dict = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [rows, IN_FEATURES],
                "data": toy_input(rows).ravel().tolist(),
            }
        ]
    }
    if parameters:
        body["parameters"] = parameters
    return body
