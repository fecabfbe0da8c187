"""The real all-MiniLM-L6-v2: export, int8 quality against fp32 PyTorch, packages, serving.

Slow (one shared export + quantisation + reference embeddings, about a minute
on two cores): run with ``-m slow``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from cloud.pipeline.gate import GateError
from cloud.pipeline.minilm import CLOUD_MAX_TOKENS, EDGE_MAX_TOKENS, onnx_opset
from cloud.pipeline.minilm_package import (
    MIN_COSINE,
    build_minilm_packages,
    embed_onnx,
    embed_torch,
    load_sentences,
    token_counts,
)
from common.inference import InferRequest, Tensor
from common.manifest import Manifest
from common.onnx_runtime import OnnxRuntime
from common.text import SequenceTooLongError
from tests.minilm_fixtures import minilm_build

# One shared build takes minutes on a busy two-core machine: past the default 300 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_shipped_sentences_are_a_few_hundred_of_many_lengths():
    texts = load_sentences()
    counts = token_counts(texts)
    assert len(texts) >= 250 and len(set(texts)) == len(texts)
    assert counts.min() < 10 and (counts > EDGE_MAX_TOKENS).sum() >= 10
    assert counts.max() <= CLOUD_MAX_TOKENS


def test_export_is_opset_17_with_dynamic_batch_and_sequence():
    build = minilm_build()
    assert onnx_opset(build.fp32_path) == 17
    graph = onnx.load(str(build.fp32_path)).graph
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in graph.input
    }
    assert inputs == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    out = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert (graph.output[0].name, out) == ("embedding", ["batch", 384])


def test_pooling_and_normalisation_are_in_the_graph():
    """fp32 ONNX == sentence-transformers, at several batch sizes and lengths, padded."""
    from sentence_transformers import SentenceTransformer

    from cloud.pipeline.minilm import model_dir

    texts = load_sentences()
    counts = token_counts(texts)
    pick = [int(np.argmin(counts)), int(np.argmax(counts)), 5, 40, 100]
    chosen = [texts[i] for i in pick]
    st = SentenceTransformer(str(model_dir()), device="cpu")
    st.max_seq_length = CLOUD_MAX_TOKENS
    expected = st.encode(chosen, batch_size=len(chosen))
    got = embed_onnx(minilm_build().fp32_path, chosen)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * expected).sum(axis=1).min() > 0.99999


def test_int8_edge_variant_passes_the_cosine_gate_and_is_small():
    build = minilm_build()
    figures = build.figures
    assert figures["int8_mean_cosine"] >= MIN_COSINE
    assert figures["fp32_onnx_mean_cosine"] > 0.99999
    assert figures["int8_bytes"] <= 0.30 * figures["fp32_bytes"]
    edge, cloud = build.edge, build.cloud
    assert edge.evaluation["mean_cosine"] == figures["int8_mean_cosine"]
    assert (edge.precision, edge.routing.max_sequence_length) == ("int8", EDGE_MAX_TOKENS)
    assert (cloud.precision, cloud.routing.max_sequence_length) == ("fp32", CLOUD_MAX_TOKENS)
    for manifest in (edge, cloud):
        assert manifest.file("tokenizer").name == "tokenizer.json"
        assert Manifest.from_dict(manifest.to_dict()) == manifest


def test_a_variant_under_the_gate_is_refused_saying_by_how_much(tmp_path):
    build = minilm_build()
    texts = load_sentences()[:40]
    with pytest.raises(GateError, match=r"below the 0\.99999 floor") as err:
        build_minilm_packages(
            tmp_path,
            fp32_path=build.fp32_path,
            int8_path=build.int8_path,
            reference=embed_torch(texts),
            texts=texts,
            min_cosine=0.99999,
        )
    assert err.value.quality is not None
    assert f"is {0.99999 - err.value.quality:.2g} below" in str(err.value)
    assert not (tmp_path / "pkg-edge").exists()


async def test_packages_serve_text_with_the_reference_embeddings():
    build = minilm_build()
    texts = load_sentences()
    counts = token_counts(texts)
    short = [t for t, c in zip(texts, counts, strict=True) if c <= EDGE_MAX_TOKENS][:8]
    long = texts[int(np.argmax(counts))]
    edge = OnnxRuntime(build.edge_dir / "model.onnx", build.edge)
    cloud = OnnxRuntime(build.cloud_dir / "model.onnx", build.cloud)
    await edge.load()
    await cloud.load()

    def request(batch: list[str]) -> InferRequest:
        data = np.empty(len(batch), dtype=object)
        data[:] = [t.encode() for t in batch]
        return InferRequest("minilm", [Tensor("text", data)])

    reference = embed_torch([*short, long])
    got = (await edge.infer(request(short))).outputs[0].data
    assert (got * reference[:-1]).sum(axis=1).mean() >= MIN_COSINE
    with pytest.raises(SequenceTooLongError):
        await edge.infer(request([long]))
    got = (await cloud.infer(request([long]))).outputs[0].data
    assert float(got[0] @ reference[-1]) > 0.9999
