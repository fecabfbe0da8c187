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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from common.inference import (
    DEGRADED,
    ESCALATION_REASON,
    ROUTE,
    SERVED_BY,
    InferRequest,
    Tensor,
    request_to_rest,
    response_from_rest,
)
from fogline.report import pct, where_lines
from fogline.traffic import PhaseResult, Target

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
    statuses: dict[int, int] = field(default_factory=dict)

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
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
    started = time.perf_counter()
    async with session.post(
        f"{target.url}/v2/models/{model}/infer", json=request_to_rest(req), headers=headers
    ) as resp:
        body = await resp.read()
    elapsed_ms = (time.perf_counter() - started) * 1000
    result.requests += 1
    result.samples += 1
    result.statuses[resp.status] = result.statuses.get(resp.status, 0) + 1
    if resp.status != 200:
        result.errors += 1
        return
    answer = response_from_rest(body)
    params: dict[str, Any] = answer.parameters
    served = params.get(SERVED_BY, "edge")
    result.latency_ms["cloud" if served == "cloud" else "edge"].append(elapsed_ms)
    reason = params.get(ESCALATION_REASON)
    if reason:
        result.reasons[reason] = result.reasons.get(reason, 0) + 1
    result.degraded += bool(params.get(DEGRADED))
    if reference is not None:
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
    figures: dict[str, Any],
    rollout: dict[str, Any],
    results: dict[str, TextPhase],
    endpoints: dict[str, str],
    broker: Any,
    timings: dict[str, float],
) -> dict[str, Any]:
    edge, cloud, hybrid, too_long = (results[k] for k in ("edge", "cloud", "hybrid", "too_long"))
    agent_rows = [
        {
            "device_id": a.name,
            "model": (devices.get(a.name, {}).get("models") or [{}])[0].get("name"),
            "version": (devices.get(a.name, {}).get("models") or [{}])[0].get("version"),
            "url": a.url,
            "state": devices.get(a.name, {}).get("state"),
        }
        for a in agents
    ]

    def cos(phase: TextPhase) -> float | None:
        value = phase.mean_cosine
        return None if value is None else round(value, 5)

    refused = sorted(too_long.statuses)
    report: dict[str, Any] = {
        "model": MODEL,
        "mean_cosine": {"edge": cos(edge), "cloud": cos(cloud), "hybrid": cos(hybrid)},
        "offline_mean_cosine": {
            "int8": round(figures["int8_mean_cosine"], 5),
            "int8_all_lengths": round(figures["int8_mean_cosine_all_lengths"], 5),
            "fp32_onnx": round(figures["fp32_onnx_mean_cosine"], 5),
        },
        "escalated_fraction": round(hybrid.escalated_fraction, 4),
        "escalation_reasons": hybrid.reasons,
        "texts_over_edge_limit": int(figures["texts_over_edge_limit"]),
        "latency_ms": {
            "local_p50": pct(hybrid.latency_ms["edge"], 50),
            "local_p99": pct(hybrid.latency_ms["edge"], 99),
            "escalated_p50": pct(hybrid.latency_ms["cloud"], 50),
            "escalated_p99": pct(hybrid.latency_ms["cloud"], 99),
        },
        "too_long_status": refused[0] if refused else None,
        "samples": hybrid.samples,
        "errors": edge.errors + cloud.errors + hybrid.errors,
        "degraded": hybrid.degraded,
        "model_bytes": {"fp32": int(figures["fp32_bytes"]), "int8": int(figures["int8_bytes"])},
        "rollout_seconds": rollout["seconds"],
        "rollout_state": rollout["state"],
        "agents": agent_rows,
        "endpoints": endpoints,
        "broker": {"kind": broker.kind, "url": broker.url},
        "build_seconds": round(timings.get("build_seconds", 0.0), 2),
    }
    report["ok"] = (
        rollout["state"] == "succeeded"
        and report["errors"] == 0
        and report["too_long_status"] is not None
        and 400 <= report["too_long_status"] < 500
        and all(a["version"] == rollout["version"] for a in agent_rows)
    )
    return report


def render_text_table(r: dict[str, Any]) -> str:
    lat, cos = r["latency_ms"], r["mean_cosine"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} ms"

    def c(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [
        "",
        "Fogline demo report (MiniLM sentence embeddings)",
        "================================================",
        f"broker            {r['broker']['kind']} at {r['broker']['url']}",
        f"rollout           {r['rollout_state']} in {r['rollout_seconds']:.2f} s "
        f"to {len(r['agents'])} agents",
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
        f"latency local     p50 {ms(lat['local_p50'])}  p99 {ms(lat['local_p99'])}",
        f"latency escalated p50 {ms(lat['escalated_p50'])}  p99 {ms(lat['escalated_p99'])}",
        "",
        *where_lines(r),
    ]
    return "\n".join(lines)
