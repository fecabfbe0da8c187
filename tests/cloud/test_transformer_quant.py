"""Fused transformer graphs and the int8 search's candidates for them, on a tiny real BERT.

The model is MiniLM's recipe (``SentenceEmbedder``: BERT + masked mean pooling +
L2 normalisation) at a size that exports in a second or two: 2 layers, 4 heads,
hidden 32, random weights. Fusion, quantization and scoring run through real
ONNX Runtime sessions; the real MiniLM is in ``test_minilm.py`` (slow).

The tests that export the tiny BERT are marked slow: importing torch and
transformers and tracing take a minute and more on the busy two-core machine
(about 15 s of CPU). The candidate and fusion-refusal tests need no export.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from cloud.pipeline.fusion import FusionError, fuse_transformer
from cloud.pipeline.gate import MEAN_COSINE, QualityGate
from cloud.pipeline.model_data import ModelData
from cloud.pipeline.quant_search import (
    base_candidates,
    option_candidates,
    search,
)
from cloud.pipeline.quantize import DYNAMIC, STATIC, QuantConfig, quantize
from common.onnx_runtime import open_session

LAYERS, HEADS, HIDDEN, VOCAB, POSITIONS = 2, 4, 32, 120, 64


def _export_tiny_bert(path: Path) -> Path:
    import warnings

    import torch
    from transformers import BertConfig, BertModel

    from cloud.pipeline.export import export_onnx
    from cloud.pipeline.minilm import SentenceEmbedder

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
        max_position_embeddings=POSITIONS, attn_implementation="eager",
    )  # fmt: skip
    # NOTE: on the config: transformers 5 took the keyword off the model's constructor.
    model = SentenceEmbedder(BertModel(config)).eval()
    sequence = {1: "sequence"}
    with warnings.catch_warnings():  # the tracer's notes on transformers' mask code
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        return export_onnx(
            model,
            path,
            examples={
                "input_ids": torch.tensor([[1, 7, 9, 2]]),
                "attention_mask": torch.ones(1, 4, dtype=torch.int64),
            },
            output_names=("embedding",),
            dynamic_axes={"input_ids": sequence, "attention_mask": sequence},
            opset=17,
        )


def _rows(n: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` rows of token ids, each with its own length (the rest padded, mask 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(n, width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, length in enumerate(rng.integers(2, width + 1, size=n)):
        mask[i, :length] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(open_session(path).run(None, feeds)[0])


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(plain export, fused graph) of the tiny BERT embedder."""
    work = tmp_path_factory.mktemp("tiny-bert")
    plain = _export_tiny_bert(work / "plain.onnx")
    fused = fuse_transformer(
        plain, work / "fused.onnx", num_heads=HEADS, hidden_size=HIDDEN, layers=LAYERS
    )
    assert fused.fused["Attention"] == LAYERS and fused.fused["EmbedLayerNormalization"] == 1
    return plain, fused.path


@pytest.mark.slow
def test_fused_graph_keeps_outputs_and_dynamic_axes(bert: tuple[Path, Path]) -> None:
    plain, fused = bert
    ops = _ops(fused)
    assert ops["Attention"] == LAYERS and ops["SkipLayerNormalization"] == 2 * LAYERS
    assert ops["EmbedLayerNormalization"] == 1 and ops["BiasGelu"] == LAYERS
    session = open_session(fused)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    for n, width in ((1, 3), (5, 17), (3, POSITIONS)):  # up to the position table's length
        feeds = _rows(n, width, seed=width)
        want, got = _run(plain, feeds), _run(fused, feeds)
        assert got.shape == want.shape == (n, HIDDEN)
        assert float((got * want).sum(axis=1).min()) > 0.99999


def test_fusion_refuses_a_graph_without_the_pattern(tmp_path: Path) -> None:
    """A graph with no attention (one MatMul) fuses nothing: an error, no file."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    src = tmp_path / "matmul.onnx"
    onnx.save(model, str(src))
    with pytest.raises(FusionError, match=f"fused 0 of {LAYERS} attention blocks"):
        fuse_transformer(
            src, tmp_path / "x.onnx", num_heads=HEADS, hidden_size=HIDDEN, layers=LAYERS
        )
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_dynamic_int8_of_the_fused_graph_uses_qattention(bert: tuple[Path, Path], tmp_path):
    _, fused = bert
    config = QuantConfig(DYNAMIC, op_types=("MatMul", "Gather", "Attention",
                                            "EmbedLayerNormalization"))  # fmt: skip
    int8 = quantize(fused, tmp_path / "int8.onnx", config)  # dynamic: no calibration rows
    ops = _ops(int8)
    assert ops["QAttention"] == LAYERS and ops["QEmbedLayerNormalization"] == 1
    assert "Attention" not in ops and ops["MatMulInteger"] == 3 * LAYERS
    feeds = _rows(8, 24)
    cos = (_run(int8, feeds) * _run(fused, feeds)).sum(axis=1)
    assert float(cos.mean()) > 0.95  # int8 of random weights: close, not equal
    # Kept fp32 by name: that Attention stays a float Attention.
    kept = quantize(
        fused, tmp_path / "kept.onnx", QuantConfig(DYNAMIC, op_types=config.op_types,
                                                   exclude_nodes=("Attention_0",)),
    )  # fmt: skip
    assert _ops(kept)["Attention"] == 1 and _ops(kept)["QAttention"] == LAYERS - 1


def test_candidates_for_a_fused_graph() -> None:
    present = {"MatMul", "Attention", "EmbedLayerNormalization"}
    configs = base_candidates(present)
    dynamic = [c for c in configs if c.method == DYNAMIC]
    static = [c for c in configs if c.method == STATIC]
    assert {c.per_channel for c in dynamic} == {True, False}
    assert all(set(c.quantized_op_types) == present for c in dynamic)
    # QDQ has no Attention/EmbedLayerNormalization: static quantizes the MatMuls only.
    assert all(c.quantized_op_types == ["MatMul"] for c in static)
    options = option_candidates(dynamic[0])
    assert [c.label() for c in options] == [
        "dynamic per-channel reduce-range",
        "dynamic per-channel asym-weights",
    ]
    assert option_candidates(static[0])[-1].params()["activation_symmetric"] is True


@pytest.mark.slow
def test_search_tries_the_fused_ops_options_and_holds_the_size_budget(
    bert: tuple[Path, Path], tmp_path: Path
) -> None:
    _, fused = bert
    calibration = _rows(32, 16, seed=1)
    data = ModelData(_rows(48, 16, seed=2), reference=_run(fused, _rows(48, 16, seed=2)))

    def score(path: Path) -> float:
        return float((_run(path, data.inputs) * data.reference).sum(axis=1).mean())

    gate = QualityGate(min_cosine=0.9, max_size_ratio=0.5)
    found = search(
        fused, calibration, data, tmp_path, score, gate, metric=MEAN_COSINE,
        parent_quality=1.0, speed_batch=4, rounds=1,
    )  # fmt: skip
    labels = [t.config.label() for t in found.trials]
    assert "dynamic per-channel" in labels and "static per-channel minmax" in labels
    assert any("reduce-range" in x for x in labels) and any("asym-weights" in x for x in labels)
    by_label = {t.config.label(): t for t in found.trials}
    assert "Attention" in by_label["dynamic per-channel"].config.quantized_op_types
    # Static QDQ leaves the embeddings and attention weights fp32: over half the bytes.
    static = by_label["static per-channel minmax"]
    assert static.oversize and static.miss is not None and "50% budget" in static.miss
    assert all(t.size_bytes <= 0.5 * found.parent_size for t in found.trials if t.passed)
    best = found.best
    assert best is not None and best.config.method == DYNAMIC and best.speedup is not None
