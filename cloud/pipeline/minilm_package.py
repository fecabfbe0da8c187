"""MiniLM from weights to two publishable packages, with its quality measured and gated.

fp32 export → int8 edge variant → mean cosine of each ONNX variant's
embeddings to the fp32 PyTorch model's, over the shipped sentences
(``data/sentences.txt``: a few hundred, 3 to ~400 tokens) → packages:

- edge: int8 (``EDGE_CONFIG``, from the fused graph), texts up to
  ``EDGE_MAX_TOKENS`` tokens served locally;
- cloud: fp32 with ONNX Runtime's transformer fusions, texts up to ``CLOUD_MAX_TOKENS``.

Both carry ``tokenizer.json`` as a signed file and their sequence limit in
the routing hints. Each variant is judged on the texts it serves by the
pipeline's ``QualityGate``; one whose mean cosine is under the floor (0.99)
is refused with ``GateError``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloud.pipeline.gate import DEFAULT_MIN_COSINE, MEAN_COSINE, QualityGate
from cloud.pipeline.minilm import (
    CLOUD_MAX_TOKENS,
    EDGE_CONFIG,
    EDGE_MAX_TOKENS,
    TASK,
    export_minilm,
    load_embedder,
    tokenizer_path,
)
from cloud.pipeline.package import build_package
from cloud.pipeline.quality import mean_cosine
from cloud.pipeline.quantize import quantize
from common.errors import InvalidInputError
from common.manifest import Manifest, RoutingHints
from common.onnx_runtime import open_session
from common.text import TextEncoder
from kernels.uncertainty import NO_METRIC

logger = logging.getLogger(__name__)

SENTENCES = Path(__file__).resolve().parent / "data" / "sentences.txt"
MIN_COSINE = DEFAULT_MIN_COSINE  # the gate for embeddings (issue 6)
_BATCH = 16
_GOLDEN_TEXTS = 4


def load_sentences(path: Path = SENTENCES) -> list[str]:
    """One text per non-empty line."""
    texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise InvalidInputError(f"{path}: no sentences")
    return texts


def _encoder(max_tokens: int = CLOUD_MAX_TOKENS) -> TextEncoder:
    return TextEncoder(tokenizer_path(), max_tokens)


def token_counts(texts: list[str]) -> np.ndarray:
    """Tokens per text, special tokens included (what the servers compare to their limit)."""
    encoder = _encoder(1 << 20)
    return np.asarray([len(encoder.encode(_bytes([t]))["input_ids"][0]) for t in texts])


def _bytes(texts: list[str]) -> np.ndarray:
    array = np.empty(len(texts), dtype=object)
    array[:] = [t.encode("utf-8") for t in texts]
    return array


def _batches(texts: list[str], counts: np.ndarray) -> list[np.ndarray]:
    """Row indices in batches of similar length, so little padding is computed."""
    order = np.argsort(counts, kind="stable")
    return [order[i : i + _BATCH] for i in range(0, len(order), _BATCH)]


def embed_torch(texts: list[str]) -> np.ndarray:
    """fp32 PyTorch embeddings [N, 384]: the reference every variant is judged against."""
    import torch

    model = load_embedder()
    encoder = _encoder()
    out = np.zeros((len(texts), 384), dtype=np.float32)
    with torch.inference_mode():
        for rows in _batches(texts, token_counts(texts)):
            feeds = encoder.encode(_bytes([texts[i] for i in rows]))
            ids = torch.from_numpy(feeds["input_ids"])
            mask = torch.from_numpy(feeds["attention_mask"])
            out[rows] = model(ids, mask).numpy()
    return out


def embed_onnx(model_path: Path, texts: list[str], *, threads: int = 2) -> np.ndarray:
    """Embeddings [N, 384] from an exported MiniLM (fp32 or int8)."""
    session = open_session(Path(model_path), threads=threads)
    names = [i.name for i in session.get_inputs()]
    encoder = _encoder()
    out = np.zeros((len(texts), 384), dtype=np.float32)
    for rows in _batches(texts, token_counts(texts)):
        feeds = encoder.encode(_bytes([texts[i] for i in rows]))
        out[rows] = session.run(None, {n: feeds[n] for n in names})[0]
    return out


def golden_rows(texts: list[str]) -> dict[str, np.ndarray]:
    """Token tensors of a few short texts: every package's self-test inputs."""
    short = [t for t in texts if len(t) < 200][:_GOLDEN_TEXTS]
    feeds = _encoder(EDGE_MAX_TOKENS).encode(_bytes(short))
    return {k: feeds[k] for k in ("input_ids", "attention_mask")}


@dataclass
class MiniLMBuild:
    fp32_path: Path
    int8_path: Path
    edge_dir: Path
    cloud_dir: Path
    edge: Manifest
    cloud: Manifest
    figures: dict[str, float] = field(default_factory=dict)


def _judge(
    variant: str, out: np.ndarray, reference: np.ndarray, served: np.ndarray, gate: float
) -> dict[str, float]:
    cosines = (out[served] * reference[served]).sum(axis=1)
    figures = {
        MEAN_COSINE: mean_cosine(out[served], reference[served]),
        "min_cosine": float(cosines.min()),
        "eval_texts": float(served.sum()),
    }
    logger.info("%s: mean cosine %.4f over %d texts", variant, figures[MEAN_COSINE], served.sum())
    # The parent is the PyTorch model itself: cosine 1.
    QualityGate(min_cosine=gate).check(variant, MEAN_COSINE, 1.0, figures[MEAN_COSINE])
    return figures


def build_minilm_packages(
    workdir: Path,
    *,
    name: str = "minilm",
    version: str = "1",
    release: int = 1,
    min_cosine: float = MIN_COSINE,
    fp32_path: Path | None = None,
    int8_path: Path | None = None,
    reference: np.ndarray | None = None,
    texts: list[str] | None = None,
) -> MiniLMBuild:
    """Export (unless ``fp32_path``/``int8_path`` are given), judge, and package both variants.

    ``reference``: the fp32 PyTorch embeddings of ``texts``, if already computed.
    Writes ``pkg-edge`` and ``pkg-cloud`` under ``workdir`` (unsigned manifests
    returned; publishing signs them).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    texts = texts if texts is not None else load_sentences()
    fp32 = Path(fp32_path) if fp32_path else export_minilm(workdir / "minilm-fp32.onnx")
    if int8_path is None:
        int8_path = quantize(fp32, workdir / "minilm-int8.onnx", EDGE_CONFIG)
    int8 = Path(int8_path)
    counts = token_counts(texts)
    if reference is None:
        reference = embed_torch(texts)
    edge_served = counts <= EDGE_MAX_TOKENS
    cloud_served = counts <= CLOUD_MAX_TOKENS
    int8_out = embed_onnx(int8, texts)
    edge_eval = _judge("int8 edge", int8_out, reference, edge_served, min_cosine)
    all_int8 = mean_cosine(int8_out[cloud_served], reference[cloud_served])
    cloud_eval = _judge("fp32 cloud", embed_onnx(fp32, texts), reference, cloud_served, min_cosine)
    golden = golden_rows(texts)
    common = {"name": name, "version": version, "release": release, "task": TASK}
    edge = build_package(
        int8,
        workdir / "pkg-edge",
        variant="edge",
        precision="int8",
        golden_rows=golden,
        evaluation=edge_eval,
        routing=RoutingHints(NO_METRIC, 1.0, 32, EDGE_MAX_TOKENS),
        tokenizer=tokenizer_path(),
        **common,  # type: ignore[arg-type]
    )
    cloud = build_package(
        fp32,
        workdir / "pkg-cloud",
        variant="cloud",
        precision="fp32",
        golden_rows=golden,
        evaluation=cloud_eval,
        routing=RoutingHints(NO_METRIC, 1.0, 1 << 20, CLOUD_MAX_TOKENS),
        tokenizer=tokenizer_path(),
        **common,  # type: ignore[arg-type]
    )
    figures = {
        "int8_mean_cosine": edge_eval[MEAN_COSINE],
        "int8_min_cosine": edge_eval["min_cosine"],
        "int8_mean_cosine_all_lengths": all_int8,
        "fp32_onnx_mean_cosine": cloud_eval[MEAN_COSINE],
        "fp32_bytes": float(fp32.stat().st_size),
        "int8_bytes": float(int8.stat().st_size),
        "texts": float(len(texts)),
        "texts_over_edge_limit": float((~edge_served).sum()),
    }
    edge_dir, cloud_dir = workdir / "pkg-edge", workdir / "pkg-cloud"
    return MiniLMBuild(fp32, int8, edge_dir, cloud_dir, edge, cloud, figures)
