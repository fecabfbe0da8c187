"""Send held-out samples to V2 endpoints and record what served them, how fast, how well."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from common.inference import (
    DEGRADED,
    ESCALATION_REASON,
    ROUTE,
    SERVED_BY,
    InferRequest,
    InferResponse,
    Tensor,
    request_to_rest,
    response_from_rest,
)


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # base URL of a V2 server
    token: str | None = None


@dataclass
class PhaseResult:
    correct: int = 0
    samples: int = 0
    requests: int = 0
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: {"edge": [], "cloud": []})
    reasons: dict[str, int] = field(default_factory=dict)
    degraded: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status -> answers

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    @property
    def escalated_fraction(self) -> float:
        return len(self.latency_ms["cloud"]) / self.requests if self.requests else 0.0

    def record(
        self, status: int, body: bytes, elapsed_ms: float, samples: int
    ) -> InferResponse | None:
        """Count one answer (where it was served, why, how fast); the response if it was one."""
        self.requests += 1
        self.samples += samples
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status != 200:
            self.errors += 1
            return None
        answer = response_from_rest(body)
        params: dict[str, Any] = answer.parameters
        served = params.get(SERVED_BY, "edge")
        self.latency_ms["cloud" if served == "cloud" else "edge"].append(elapsed_ms)
        reason = params.get(ESCALATION_REASON)
        if reason:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.degraded += bool(params.get(DEGRADED))
        return answer


async def run_phase(
    targets: list[Target],
    model: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    route: str,
    batch: int = 1,
    stop: asyncio.Event | None = None,
) -> PhaseResult:
    """One request at a time (so latency is not queueing), round-robin over targets;
    ``stop``: end early once it is set."""
    result = PhaseResult()
    async with aiohttp.ClientSession() as session:
        for i, start in enumerate(range(0, len(x), batch)):
            if stop is not None and stop.is_set():
                break
            target = targets[i % len(targets)]
            rows, labels = x[start : start + batch], y[start : start + batch]
            await _one(session, target, model, rows, labels, route, result)
    return result


async def send(
    session: aiohttp.ClientSession,
    target: Target,
    req: InferRequest,
    result: PhaseResult,
    *,
    samples: int,
) -> InferResponse | None:
    """POST ``req`` to ``target`` and record the answer in ``result``; the response if any."""
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
    started = time.perf_counter()
    async with session.post(
        f"{target.url}/v2/models/{req.model}/infer", json=request_to_rest(req), headers=headers
    ) as resp:
        body = await resp.read()
    elapsed_ms = (time.perf_counter() - started) * 1000
    return result.record(resp.status, body, elapsed_ms, samples)


async def _one(
    session: aiohttp.ClientSession,
    target: Target,
    model: str,
    rows: np.ndarray,
    labels: np.ndarray,
    route: str,
    result: PhaseResult,
) -> None:
    req = InferRequest(
        model=model, inputs=[Tensor("input", rows.astype(np.float32))], parameters={ROUTE: route}
    )
    answer = await send(session, target, req, result, samples=len(rows))
    if answer is not None:
        predicted = answer.output("probabilities").data.argmax(axis=-1)
        result.correct += int((predicted == labels).sum())
