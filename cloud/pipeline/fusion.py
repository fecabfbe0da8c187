"""Transformer operator fusion with ONNX Runtime's offline optimizer, before quantizing.

``onnxruntime.transformers.optimizer`` rewrites a BERT-shaped export into
ORT's fused CPU kernels: ``EmbedLayerNormalization`` (the embeddings and their
LayerNorm), one ``Attention`` per layer (Q, K and V in one packed MatMul, the
scores, mask and softmax in one kernel), ``SkipLayerNormalization`` (residual +
LayerNorm) and ``BiasGelu``. The fused fp32 graph is itself faster, and
``quantize_dynamic`` turns the fused ops into ``QAttention`` and
``QEmbedLayerNormalization``, which are much faster than MatMulInteger around
an unfused attention. The graph keeps its inputs, outputs and dynamic axes.

Only the Python fusions run (``opt_level=0``): the file stays portable, and
ONNX Runtime still applies its own graph optimisations when a session loads it.

NOTE: torch-free.
"""

from __future__ import annotations

import logging
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from common.errors import FoglineError

logger = logging.getLogger(__name__)

# Ops the fusion makes that ``quantize_dynamic`` knows how to quantize.
FUSED_QUANTIZABLE = ("Attention", "EmbedLayerNormalization")


class FusionError(FoglineError, ValueError):
    """The optimizer did not find the transformer pattern it was asked to fuse."""


@dataclass(frozen=True)
class FusionReport:
    path: Path
    fused: dict[str, int]  # fused op type -> how many (only those made)


def fuse_transformer(
    src: Path,
    out: Path,
    *,
    num_heads: int,
    hidden_size: int,
    layers: int,
    model_type: str = "bert",
) -> FusionReport:
    """Write ``src`` with its attention, LayerNorm, Gelu and embeddings fused to ``out``.

    Raise ``FusionError`` unless every one of ``layers`` attention blocks was fused:
    a half-fused graph would be a slower, untested shape.
    """
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with redirect_stdout(sys.stderr):  # the optimizer prints; stdout is for results (--json)
        model = optimizer.optimize_model(
            str(src),
            model_type=model_type,
            num_heads=num_heads,
            hidden_size=hidden_size,
            optimization_options=FusionOptions(model_type),
            opt_level=0,
            use_gpu=False,
        )
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    if stats.get("Attention", 0) != layers:
        raise FusionError(
            f"{Path(src).name}: fused {stats.get('Attention', 0)} of {layers} attention "
            f"blocks ({stats}); the graph is not the {model_type} pattern the optimizer knows"
        )
    tmp = out.with_name(out.name + ".tmp")
    model.save_model_to_file(str(tmp))
    tmp.replace(out)
    logger.info("fused %s -> %s: %s", src, out, stats)
    return FusionReport(out, stats)
