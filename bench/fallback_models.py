"""The models ``bench.fallback`` serves: built here, signed, packaged (no download).

The digits CNN (the cloud variant, one epoch: throughput does not depend on
accuracy) and MiniLM fp32 and int8 from the weights package, with request
bodies of batch 1 (MiniLM: 128 tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.inference import InferRequest, Tensor, request_to_rest
from common.manifest import RoutingHints, SignedManifest, write_package
from common.signing import Signer

MINILM_TOKENS = 128
MAX_BATCH = 32  # the packages' hint (routing.max_local_batch): the most the batcher forms


@dataclass(frozen=True)
class BenchModel:
    key: str  # digits | minilm_int8 | minilm_fp32
    name: str  # the served model name
    package: Path  # a signed package directory
    body: bytes  # one V2 JSON request, batch 1
    example: dict[str, np.ndarray]  # the same request's tensors

    @property
    def model_file(self) -> Path:
        return self.package / "model.onnx"


def _body(name: str, feeds: dict[str, np.ndarray]) -> bytes:
    request = InferRequest(name, [Tensor(n, a) for n, a in feeds.items()])
    return json.dumps(request_to_rest(request)).encode()


def _package(
    model: Path,
    out: Path,
    name: str,
    precision: str,
    golden: np.ndarray | dict[str, np.ndarray],
    signer: Signer,
    task: str | None = None,
) -> Path:
    from cloud.pipeline.package import build_package

    extra = {"task": task} if task else {}
    manifest = build_package(
        model,
        out,
        name=name,
        version="1",
        release=1,
        variant="cloud",
        precision=precision,
        golden_rows=golden,
        evaluation={},
        routing=RoutingHints(max_local_batch=MAX_BATCH),
        **extra,  # type: ignore[arg-type]
    )
    write_package(out, SignedManifest.sign(manifest, signer))
    return out


def digits(workdir: Path, signer: Signer) -> BenchModel:
    from cloud.pipeline.data import load_digits_split
    from cloud.pipeline.export import export_onnx
    from cloud.pipeline.train import train_model

    split = load_digits_split(0)
    fp32 = export_onnx(train_model("cloud", split, epochs=1), workdir / "digits.onnx")
    pkg = _package(fp32, workdir / "digits-pkg", "digits", "fp32", split.x_test[:8], signer)
    feeds = {"input": np.ascontiguousarray(split.x_test[:1], dtype=np.float32)}
    return BenchModel("digits", "digits", pkg, _body("digits", feeds), feeds)


def minilm_tokens(rows: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """``rows`` sequences of 128 tokens ([CLS] ... [SEP]), all attended."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(rows, MINILM_TOKENS), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def minilm(workdir: Path, signer: Signer) -> tuple[BenchModel, BenchModel]:
    from cloud.pipeline.minilm import EDGE_CONFIG, TASK, export_minilm
    from cloud.pipeline.quantize import quantize

    fp32 = export_minilm(workdir / "minilm-fp32.onnx")
    int8 = quantize(fp32, workdir / "minilm-int8.onnx", EDGE_CONFIG)
    feeds = minilm_tokens()
    golden = minilm_tokens(4, seed=1)
    out = []
    for key, path, precision in (("minilm_int8", int8, "int8"), ("minilm_fp32", fp32, "fp32")):
        pkg = _package(path, workdir / f"{key}-pkg", key, precision, golden, signer, task=TASK)
        out.append(BenchModel(key, key, pkg, _body(key, feeds), feeds))
    return out[0], out[1]
