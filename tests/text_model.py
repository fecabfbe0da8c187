"""A small real text model for the text-input tests: MiniLM's tokenizer, a tiny embedder.

The graph takes what MiniLM takes (``input_ids``, ``attention_mask`` INT64
[batch, sequence]) and answers ``embedding`` FP32 [batch, 8]: a trained-free
token embedding, mean-pooled over the mask and normalised, exported in well
under a second. Its package ships the real ``tokenizer.json``, so the servers'
text path (tokenise, limits, heavy routing) is the one MiniLM uses.
Plain helper module: ``from tests.text_model import make_text_package``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from cloud.pipeline.minilm import CLOUD_MAX_TOKENS, EDGE_MAX_TOKENS, tokenizer_path
from cloud.pipeline.package import build_package
from common.manifest import RoutingHints, SignedManifest, write_package
from common.signing import Signer
from kernels.uncertainty import NO_METRIC
from tests.model_fixtures import Package

VOCAB = 30522
DIM = 8


@functools.lru_cache(maxsize=1)
def _toy_onnx(directory: str) -> Path:
    import torch
    from torch import nn

    from cloud.pipeline.export import export_onnx

    class ToyText(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(VOCAB, DIM)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            mask = attention_mask.unsqueeze(-1).to(torch.float32)
            pooled = (self.emb(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return nn.functional.normalize(pooled, dim=1)

    seq = {1: "sequence"}
    return export_onnx(
        ToyText(),
        Path(directory) / "toy-text.onnx",
        examples={
            "input_ids": torch.tensor([[101, 7592, 102]]),
            "attention_mask": torch.ones(1, 3, dtype=torch.int64),
        },
        output_names=("embedding",),
        dynamic_axes={"input_ids": seq, "attention_mask": seq},
    )


def make_text_package(
    directory: Path,
    *,
    variant: str = "edge",
    name: str = "text",
    signer: Signer | None = None,
    max_tokens: int | None = None,
) -> Package:
    """A signed package of the toy text model; edge takes 128 tokens, cloud 512 by default."""
    signer = signer or Signer.generate()
    model = _toy_onnx(str(directory.parent))
    limit = max_tokens or (EDGE_MAX_TOKENS if variant == "edge" else CLOUD_MAX_TOKENS)
    golden = {
        "input_ids": np.array([[101, 7592, 2088, 102]], dtype=np.int64),
        "attention_mask": np.ones((1, 4), dtype=np.int64),
    }
    manifest = build_package(
        model,
        directory,
        name=name,
        version="1",
        release=1,
        variant=variant,
        precision="fp32",
        golden_rows=golden,
        evaluation={},
        routing=RoutingHints(NO_METRIC, 1.0, 32, limit),
        task="sentence-embedding",
        tokenizer=tokenizer_path(),
    )
    signed = SignedManifest.sign(manifest, signer)
    write_package(directory, signed)
    return Package(directory, signed, signer)


def words(n: int) -> str:
    """A text of ``n`` common words: n + 2 tokens with [CLS] and [SEP]."""
    return " ".join(["word"] * n)
