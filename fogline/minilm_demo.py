"""``fogline demo --model minilm``: the demo's model work, traffic and report for text.

No training (the weights are pre-trained): export → int8 → gate on mean cosine
→ sign and publish both variants. Traffic is the shipped sentences, sent as
V2 ``BYTES`` text; the longer ones (over the edge's 128 tokens) are escalated
by the agents as ``heavy``, and one text over the cloud's 512 tokens must be
refused with a 4xx. Quality is the mean cosine of every served embedding to
the fp32 PyTorch model's embedding of the same text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from common.inference import ROUTE, InferRequest, Tensor
from fogline.report import (
    agent_rows,
    header_lines,
    latency_lines,
    latency_summary,
    rollout_ok,
    run_fields,
    where_lines,
)
from fogline.traffic import PhaseResult, Target, send

logger = logging.getLogger(__name__)

MODEL = "minilm"
OUTPUT = "embedding"


@dataclass
class TextCorpus:
    """The texts sent, their token counts, and the fp32 PyTorch embeddings to judge by."""

    texts: list[str]
    tokens: np.ndarray
    reference: np.ndarray


def build_and_publish(
    workdir: Path, control: Any, name: str, version: str, samples: int | None
) -> tuple[dict[str, Any], TextCorpus]:
    """Both MiniLM variants published as ``version``; (figures, the corpus for traffic)."""
    from cloud.pipeline.minilm import EDGE_MAX_TOKENS
    from cloud.pipeline.minilm_package import (
        build_minilm_packages,
        embed_torch,
        load_sentences,
        token_counts,
    )
    from common.manifest import write_unsigned

    texts = load_sentences()
    reference = embed_torch(texts)
    built = build_minilm_packages(
        workdir, name=name, version=version, reference=reference, texts=texts
    )
    for directory, manifest in ((built.edge_dir, built.edge), (built.cloud_dir, built.cloud)):
        write_unsigned(directory, manifest)
        control.publish(directory)
    corpus = TextCorpus(texts, token_counts(texts), reference)
    if samples and samples < len(texts):
        # Spread over the lengths, so a short run still has texts over the edge's limit.
        by_length = np.argsort(corpus.tokens, kind="stable")
        keep = np.sort(by_length[np.linspace(0, len(texts) - 1, samples).round().astype(int)])
        corpus = TextCorpus([texts[i] for i in keep], corpus.tokens[keep], reference[keep])
    figures: dict[str, Any] = dict(built.figures)
    figures["texts_over_edge_limit"] = int((corpus.tokens > EDGE_MAX_TOKENS).sum())  # of those sent
    return figures, corpus


@dataclass
class TextPhase(PhaseResult):
    cosines: list[float] = field(default_factory=list)

    @property
    def mean_cosine(self) -> float | None:
        return float(np.mean(self.cosines)) if self.cosines else None


def _text_tensor(text: str) -> Tensor:
    data = np.empty(1, dtype=object)
    data[0] = text.encode("utf-8")
    return Tensor("text", data)


async def run_text_phase(
    targets: list[Target],
    corpus: TextCorpus,
    rows: np.ndarray,
    *,
    route: str,
    model: str = MODEL,
) -> TextPhase:
    """One text per request, one request at a time, round-robin over ``targets``."""
    result = TextPhase()
    async with aiohttp.ClientSession() as session:
        for n, i in enumerate(rows):
            target = targets[n % len(targets)]
            await _one(session, target, model, corpus.texts[i], corpus.reference[i], route, result)
    return result


async def _one(
    session: aiohttp.ClientSession,
    target: Target,
    model: str,
    text: str,
    reference: np.ndarray | None,
    route: str,
    result: TextPhase,
) -> None:
    req = InferRequest(model=model, inputs=[_text_tensor(text)], parameters={ROUTE: route})
    answer = await send(session, target, req, result, samples=1)
    if answer is not None and reference is not None:
        vector = answer.output(OUTPUT).data.reshape(-1)
        result.cosines.append(float(vector @ reference))


async def send_traffic(
    agents: list[Target], cloud: Target, corpus: TextCorpus, edge_max_tokens: int
) -> dict[str, TextPhase]:
    """Edge only (texts it can take), cloud only, hybrid (all), and one text too long."""
    short = np.flatnonzero(corpus.tokens <= edge_max_tokens)
    every = np.arange(len(corpus.texts))
    phases = {
        "edge": await run_text_phase(agents, corpus, short, route="local"),
        "cloud": await run_text_phase([cloud], corpus, every, route="auto"),
        "hybrid": await run_text_phase(agents, corpus, every, route="auto"),
    }
    too_long = TextPhase()
    longest = corpus.texts[int(np.argmax(corpus.tokens))]
    async with aiohttp.ClientSession() as session:
        # Well over 512 tokens, well under the per-text byte limit.
        text = " ".join([longest] * 4)
        await _one(session, agents[0], MODEL, text, None, "auto", too_long)
    phases["too_long"] = too_long
    return phases


def build_text_report(
    *,
    agents: list[Target],
    devices: dict[str, Any],
    compression: dict[str, Any],
    rollout: dict[str, Any],
    results: dict[str, TextPhase],
    endpoints: dict[str, str],
    broker: Any,
    timings: dict[str, float],
) -> dict[str, Any]:
    edge, cloud, hybrid, too_long = (results[k] for k in ("edge", "cloud", "hybrid", "too_long"))
    agents_rows = agent_rows(agents, devices)

    def cos(phase: TextPhase) -> float | None:
        value = phase.mean_cosine
        return None if value is None else round(value, 5)

    refused = sorted(too_long.statuses)
    report: dict[str, Any] = {
        "model": MODEL,
        "mean_cosine": {"edge": cos(edge), "cloud": cos(cloud), "hybrid": cos(hybrid)},
        "offline_mean_cosine": {
            "int8": round(compression["int8_mean_cosine"], 5),
            "int8_all_lengths": round(compression["int8_mean_cosine_all_lengths"], 5),
            "fp32_onnx": round(compression["fp32_onnx_mean_cosine"], 5),
        },
        "escalated_fraction": round(hybrid.escalated_fraction, 4),
        "escalation_reasons": hybrid.reasons,
        "texts_over_edge_limit": int(compression["texts_over_edge_limit"]),
        "latency_ms": latency_summary(hybrid),
        "too_long_status": refused[0] if refused else None,
        "samples": hybrid.samples,
        "errors": edge.errors + cloud.errors + hybrid.errors,
        "degraded": hybrid.degraded,
        "model_bytes": {
            "fp32": int(compression["fp32_bytes"]),
            "int8": int(compression["int8_bytes"]),
        },
        **run_fields(agents_rows, rollout, endpoints, broker, timings),
    }
    status = report["too_long_status"]
    report["ok"] = rollout_ok(report, rollout) and status is not None and 400 <= status < 500
    return report


def render_text_table(r: dict[str, Any]) -> str:
    cos = r["mean_cosine"]

    def c(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [
        *header_lines(r, "Fogline demo report (MiniLM sentence embeddings)"),
        f"model bytes       fp32 {r['model_bytes']['fp32']:,}  int8 {r['model_bytes']['int8']:,}",
        f"offline cosine    int8 {c(r['offline_mean_cosine']['int8'])} (<=128 tokens), "
        f"fp32 ONNX {c(r['offline_mean_cosine']['fp32_onnx'])}, vs fp32 PyTorch",
        "",
        f"{'mean cosine':<18}{'edge only':>12}{'cloud only':>12}{'hybrid':>12}",
        f"{'':<18}{c(cos['edge']):>12}{c(cos['cloud']):>12}{c(cos['hybrid']):>12}",
        "",
        f"escalated         {r['escalated_fraction']:.1%} of {r['samples']} texts "
        f"{r['escalation_reasons']} ({r['texts_over_edge_limit']} over 128 tokens)",
        f"over 512 tokens   HTTP {r['too_long_status']}",
        *latency_lines(r),
        "",
        *where_lines(r),
    ]
    return "\n".join(lines)
