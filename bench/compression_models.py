"""The two models of ``bench.compression``: the digits CNN and MiniLM, ready to compress.

Each comes as its fp32 ONNX export, a PyTorch eager runner of the same
weights (the second baseline), calibration rows, the rows quality is judged
on, the rows speed is timed on, and the gate the bench holds its int8 to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud.pipeline.gate import QualityGate
from cloud.pipeline.model_data import ModelData

logger = logging.getLogger(__name__)

Runner = Callable[[dict[str, np.ndarray]], Any]
DIGITS_EPOCHS = {True: 6, False: 20}  # quick: enough for ~97% on the test split
MINILM_TOKENS = 128  # the edge variant's limit; speed is timed on full-length rows
MINILM_QUALITY_ROWS = {True: 48, False: None}  # None: every shipped sentence within the limit
MINILM_MAX_SIZE_RATIO = 0.30  # issue 6: the edge int8 within 30% of the fp32 bytes


@dataclass
class BenchModel:
    name: str
    fp32: Path
    torch_runner: Runner
    torch_quality: float
    calibration: dict[str, np.ndarray]
    data: ModelData  # judged on
    speed_feeds: dict[str, np.ndarray]
    batch: int  # throughput batch
    gate: QualityGate
    # The unoptimised export, where the shipped fp32 (``fp32``) is a fused graph: a
    # second fp32 baseline, so both ratios are reported.
    plain_fp32: Path | None = None


def _torch_runner(model: Any, names: list[str]) -> Runner:
    import torch

    def run(feeds: dict[str, np.ndarray]) -> Any:
        with torch.inference_mode():
            return model(*(torch.from_numpy(feeds[n]) for n in names))

    return run


def digits_cnn(workdir: Path, quick: bool) -> BenchModel:
    """The cloud CNN trained in-process on the digits split (seeded)."""
    import torch

    from cloud.pipeline.data import load_digits_split
    from cloud.pipeline.export import export_onnx
    from cloud.pipeline.train import train_model

    split = load_digits_split()
    model = train_model("cloud", split, epochs=DIGITS_EPOCHS[quick]).eval()
    fp32 = export_onnx(model, workdir / "digits.fp32.onnx")
    torch.set_num_threads(1)  # as ONNX Runtime gets one intra-op thread
    with torch.inference_mode():
        eager = model(torch.from_numpy(split.x_test)).numpy()
    return BenchModel(
        name="digits-cnn",
        fp32=fp32,
        torch_runner=_torch_runner(model, ["input"]),
        torch_quality=float((eager.argmax(axis=1) == split.y_test).mean()),
        calibration={"input": split.x_train},
        data=ModelData({"input": split.x_test}, labels=split.y_test),
        speed_feeds={"input": split.x_test},
        batch=256,
        gate=QualityGate(max_drop_points=0.3),
    )


def _token_rows(texts: list[str], width: int) -> dict[str, np.ndarray]:
    """Each text's tokens, zero-padded (attention mask 0) to ``width``."""
    from cloud.pipeline.minilm_package import _bytes, _encoder

    encoder = _encoder(width)
    ids = np.zeros((len(texts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, text in enumerate(texts):
        feeds = encoder.encode(_bytes([text]))
        n = feeds["input_ids"].shape[1]
        ids[i, :n], mask[i, :n] = feeds["input_ids"][0], feeds["attention_mask"][0]
    return {"input_ids": ids, "attention_mask": mask}


def minilm(workdir: Path, quick: bool, min_cosine: float) -> BenchModel:
    """all-MiniLM-L6-v2 exported with the ``minilm`` pipeline; judged on the shipped sentences
    (those within 128 tokens) against fp32 PyTorch embeddings; timed on 128-token rows.

    ``fp32`` is the shipped cloud variant (fused); ``plain_fp32`` the export before fusion.
    """
    import torch

    from cloud.pipeline.minilm import export_minilm, fuse_minilm, load_embedder
    from cloud.pipeline.minilm_package import embed_torch, load_sentences, token_counts

    texts = load_sentences()
    counts = token_counts(texts)
    texts = [t for t, n in zip(texts, counts, strict=True) if n <= MINILM_TOKENS]
    texts = texts[: MINILM_QUALITY_ROWS[quick]]
    width = int(max(token_counts(texts)))
    rows = _token_rows(texts, width)
    torch.set_num_threads(1)
    reference = embed_torch(texts)
    plain = export_minilm(workdir / "minilm.fp32-plain.onnx", fused=False)
    fp32 = fuse_minilm(plain, workdir / "minilm.fp32.onnx")
    full = _token_rows(texts[:64], MINILM_TOKENS)
    full["attention_mask"][:] = 1  # every position real: 128 tokens of work per row
    return BenchModel(
        name="minilm",
        fp32=fp32,
        torch_runner=_torch_runner(load_embedder(), ["input_ids", "attention_mask"]),
        torch_quality=1.0,  # the reference itself
        calibration=rows,
        data=ModelData(rows, reference=reference),
        speed_feeds=full,
        batch=32,
        gate=QualityGate(min_cosine=min_cosine, max_size_ratio=MINILM_MAX_SIZE_RATIO),
        plain_fp32=plain,
    )
