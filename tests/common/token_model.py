"""A tiny token model (Embedding → masked mean → Linear), exported for real: the shape of
MiniLM's inputs (``input_ids``, ``attention_mask``) at a size a test can build in a second.

An id past the vocabulary makes ONNX Runtime's Gather fail: a real malformed row.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.manifest import Manifest, TensorSpec
from common.onnx_runtime import OnnxRuntime

VOCAB = 50
CLASSES = 3


def token_model_bytes() -> bytes:
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 8)
            self.head = nn.Linear(8, CLASSES)

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            mask = attention_mask.unsqueeze(-1).to(torch.float32)
            pooled = (self.emb(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(pooled), pooled

    torch.manual_seed(0)
    buf = io.BytesIO()
    dyn = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            Tiny().eval(),
            (torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, 4, dtype=torch.int64)),
            buf,
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits", "pooled"],
            dynamic_axes={
                "input_ids": dyn,
                "attention_mask": dyn,
                "logits": {0: "batch"},
                "pooled": {0: "batch"},
            },
        )
    return buf.getvalue()


@dataclass
class TokenModel:
    path: Path
    manifest: Manifest

    def runtime(self) -> OnnxRuntime:
        return OnnxRuntime(self.path, self.manifest)


def make_token_model(directory: Path) -> TokenModel:
    path = directory / "tokens.onnx"
    path.write_bytes(token_model_bytes())
    manifest = Manifest(
        name="tokens",
        version="1",
        release=1,
        variant="cloud",
        task="classification",
        format="onnx",
        precision="fp32",
        files=[],
        inputs=[
            TensorSpec("input_ids", "INT64", [-1, -1]),
            TensorSpec("attention_mask", "INT64", [-1, -1]),
        ],
        outputs=[
            TensorSpec("logits", "FP32", [-1, CLASSES]),
            TensorSpec("pooled", "FP32", [-1, 8]),
        ],
    )
    return TokenModel(path, manifest)


def tokens(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, size=(1, length), dtype=np.int64)
