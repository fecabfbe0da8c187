"""The edge router: a Runtime composing the local model and the cloud fallback.

Per request (DESIGN.md "Router"): ``fogline.route`` = local | cloud forces a
path; otherwise no healthy local model → cloud, too many rows (or tokens) → cloud, local
queue over its latency budget → cloud (reason ``load``, only while the cloud
answers faster than the queue would: its recent latency is tracked, and
measured again by one request when it is older than ``cloud_probe_s``), else
run locally and escalate when the result is too uncertain. A cloud that
fails (or whose circuit is open) gets the local answer marked
``fogline.degraded``; with no local model either, the caller gets
``CloudUnavailableError`` (502).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from common import tracing
from common.errors import CloudUnavailableError, InvalidInputError, ModelNotReadyError
from common.inference import (
    DEGRADED,
    DEGRADED_REASON,
    ESCALATION_REASON,
    MODEL_VERSION,
    ROUTE,
    SERVED_BY,
    UNCERTAINTY,
    InferRequest,
    InferResponse,
)
from common.manifest import RoutingHints
from common.runtime import ModelInfo, Runtime
from common.text import SequenceTooLongError
from edge.circuit_breaker import CircuitBreaker
from edge.cloud_client import CloudConnectError, CloudTooLargeError
from edge.load_gauge import LoadGauge
from kernels import uncertainty

logger = logging.getLogger(__name__)

ROUTES = ("auto", "local", "cloud")


@dataclass(frozen=True)
class RouterPolicy:
    local_budget_ms: float = 100.0  # expected local queueing past this → cloud ("load")
    uncertainty_threshold: float | None = None  # None: the package's routing hint
    max_local_batch: int | None = None  # None: the package's routing hint
    cloud_probe_s: float = 5.0  # cloud latency older than this is measured again
    breaker_failures: int = 5  # consecutive cloud failures that open the circuit
    breaker_cooldown_s: float = 30.0  # open → half-open (one trial request) after this
    retry_backoff_s: float = 0.05  # base delay of the one retry on a connection error
    ewma_alpha: float = 0.2  # weight of the newest latency in its moving average


# Upper bounds (ms) of the latency histogram in telemetry; one more bucket for the rest.
# NOTE: cloud.serving_history.LATENCY_BUCKETS_MS reads them; keep the two in step.
LATENCY_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class LatencyWindow:
    """Count, total and a histogram since start, percentiles over the most recent samples."""

    def __init__(self, size: int = 1024) -> None:
        self._recent: deque[float] = deque(maxlen=size)
        self.count = 0
        self.total_ms = 0.0
        self.hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)

    def add(self, ms: float) -> None:
        self._recent.append(ms)
        self.count += 1
        self.total_ms += ms
        self.hist[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1

    def summary(self) -> dict[str, float | list[int]]:
        if not self._recent:
            return {"count": 0}
        recent = np.asarray(self._recent)
        return {
            "count": self.count,
            "mean_ms": self.total_ms / self.count,
            "p50_ms": float(np.percentile(recent, 50)),
            "p95_ms": float(np.percentile(recent, 95)),
            "max_ms": float(recent.max()),
            "hist": list(self.hist),
        }


@dataclass
class RouterStats:
    requests: int = 0
    served_local: int = 0
    served_cloud: int = 0
    escalated: Counter[str] = field(default_factory=Counter)
    degraded: int = 0
    cloud_errors: int = 0
    circuit_rejections: int = 0
    errors: int = 0  # requests that ended in an error (the rollout gates' error rate)
    latency: dict[str, LatencyWindow] = field(
        default_factory=lambda: {k: LatencyWindow() for k in ("total", "local", "cloud")}
    )


@dataclass(frozen=True)
class _Local:
    """The local model and its routing hints, swapped together as one value."""

    runtime: Runtime
    hints: RoutingHints


class Router:
    """A Runtime that serves locally when it can and falls back to the cloud.

    NOTE: the router owns ``remote`` (``load``/``unload`` open and close it) but
    only borrows the local runtime: the model store loads, swaps and unloads it.
    """

    def __init__(
        self,
        name: str,
        remote: Runtime | None,
        *,
        policy: RouterPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.remote = remote
        self.policy = policy or RouterPolicy()
        # Told of each escalation the cloud answered: (local version, request, the cloud's
        # answer, reason); the agent keeps some as hard examples. Must not block or raise.
        self.on_escalated: Callable[[str, InferRequest, InferResponse, str], None] | None = None
        self.breaker = CircuitBreaker(
            failures=self.policy.breaker_failures,
            cooldown_s=self.policy.breaker_cooldown_s,
            clock=clock,
            name=f"{name}->cloud",
        )
        self._rng = rng or random.Random()
        self._local: _Local | None = None
        self._last_info: ModelInfo | None = None
        self.gauge = LoadGauge(clock, self.policy.ewma_alpha)
        self._stats = RouterStats()

    def set_policy(self, policy: RouterPolicy) -> None:
        """Replace the policy (a signed set-policy command); the next request uses it."""
        self.policy = policy
        logger.info("router %s: policy is now %s", self.name, policy)

    # --- the model store's side -------------------------------------------------------

    def set_local(self, runtime: Runtime | None, hints: RoutingHints | None = None) -> None:
        """Swap the local model (already loaded and self-tested); None removes it."""
        hints = hints or RoutingHints()
        known = (*uncertainty.METRICS, uncertainty.NO_METRIC)
        if hints.uncertainty_metric not in known:
            raise InvalidInputError(f"unknown uncertainty metric {hints.uncertainty_metric!r}")
        self._local = _Local(runtime, hints) if runtime is not None else None
        self.gauge.new_local_model()
        if runtime is not None:
            self._last_info = runtime.info
        logger.info("router %s: local model is now %s", self.name, self.local_version)

    @property
    def local_version(self) -> str | None:
        local = self._local
        return local.runtime.info.version if local is not None else None

    # --- Runtime ----------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        local = self._local
        base = local.runtime.info if local is not None else self._last_info
        if base is None and self.remote is not None:
            base = self.remote.info
        if base is None:
            return ModelInfo(self.name, "", "fogline_router", [], [])
        return replace(base, name=self.name)

    @property
    def ready(self) -> bool:
        local = self._local
        if local is not None and local.runtime.ready:
            return True
        return self.remote is not None and self.remote.ready

    async def load(self) -> None:
        if self.remote is not None:
            await self.remote.load()

    async def unload(self) -> None:
        if self.remote is not None:
            await self.remote.unload()

    async def infer(self, request: InferRequest) -> InferResponse:
        start = time.perf_counter()
        self._stats.requests += 1
        route = _route_of(request)
        local = self._local  # one snapshot per request: a swap never splits a request
        try:
            if route == "local":
                response = await self._forced_local(request, local)
            elif route == "cloud":
                response = await self._escalate(request, local, "forced")
            else:
                response = await self._auto(request, local)
        except InvalidInputError:
            raise  # the caller's fault, not the model's
        except Exception:
            self._stats.errors += 1
            raise
        self._stats.latency["total"].add((time.perf_counter() - start) * 1000)
        return response

    def stats(self, *, reset: bool = False) -> dict[str, object]:
        """Counters and latency summaries for telemetry; ``reset`` starts a new period."""
        s = self._stats
        out: dict[str, object] = {
            "requests": s.requests,
            "served_local": s.served_local,
            "served_cloud": s.served_cloud,
            "escalated": dict(s.escalated),
            "degraded": s.degraded,
            "cloud_errors": s.cloud_errors,
            "circuit_rejections": s.circuit_rejections,
            "errors": s.errors,
            "model": self.name,
            "circuit": self.breaker.state,
            "local_version": self.local_version,
            "expected_wait_ms": self.gauge.expected_wait_ms(),
            "cloud_latency_ms": self.gauge.cloud_latency_ms(),
            "latency_ms": {k: w.summary() for k, w in s.latency.items()},
        }
        if reset:
            self._stats = RouterStats()
        return out

    # --- decisions --------------------------------------------------------------------

    async def _auto(self, request: InferRequest, local: _Local | None) -> InferResponse:
        reason = self._pre_route(request, local)
        if reason is not None:
            return await self._escalate(request, local, reason)
        assert local is not None  # _pre_route said "no_local_model" otherwise
        try:
            response, score = await self._run_local(local, request)
        except ModelNotReadyError:  # unloaded under us by a swap: the cloud can still answer
            return await self._escalate(request, None, "no_local_model")
        except SequenceTooLongError:
            # Longer than the local model serves (known once tokenised): the cloud's
            # variant takes longer texts; no local answer to fall back on.
            return await self._escalate(request, None, "heavy")
        if score is not None and score > self._threshold(local):
            return await self._escalate(request, local, "uncertain", response, score)
        return self._served_local(response, local, score)

    def _pre_route(self, request: InferRequest, local: _Local | None) -> str | None:
        if local is None or not local.runtime.ready:
            return "no_local_model"
        limit = self.policy.max_local_batch
        if _rows(request) > (local.hints.max_local_batch if limit is None else limit):
            return "heavy"
        policy = self.policy
        if self.remote is not None and self.gauge.offload(
            policy.local_budget_ms, policy.cloud_probe_s
        ):
            return "load"
        return None

    def _threshold(self, local: _Local) -> float:
        threshold = self.policy.uncertainty_threshold
        return local.hints.uncertainty_threshold if threshold is None else threshold

    async def _forced_local(self, request: InferRequest, local: _Local | None) -> InferResponse:
        if local is None or not local.runtime.ready:
            raise ModelNotReadyError(f"model {self.name!r} has no local model loaded")
        response, score = await self._run_local(local, request)
        return self._served_local(response, local, score)

    async def _escalate(
        self,
        request: InferRequest,
        local: _Local | None,
        reason: str,
        local_response: InferResponse | None = None,
        score: float | None = None,
    ) -> InferResponse:
        self._stats.escalated[reason] += 1
        try:
            attributes = {"fogline.model": self.name, ESCALATION_REASON: reason}
            with tracing.span("escalate", attributes=attributes):
                response = await self._call_cloud(request)
        except (CloudUnavailableError, CloudTooLargeError) as exc:
            # Too large for the cloud is no fault of the request: the local answer stands.
            return await self._degrade(request, local, reason, local_response, score, exc)
        except InvalidInputError as exc:
            if local_response is None:
                raise  # the request is bad: tell the caller
            logger.warning("cloud refused a request the local model served: %s", exc)
            return await self._degrade(request, local, reason, local_response, score, exc)
        self._stats.served_cloud += 1
        if self.on_escalated is not None and local is not None:
            self.on_escalated(local.runtime.info.version, request, response, reason)
        version = response.parameters.get(MODEL_VERSION) or response.version or ""
        return self._tag(response, "cloud", str(version), reason=reason, score=score)

    async def _degrade(
        self,
        request: InferRequest,
        local: _Local | None,
        reason: str,
        local_response: InferResponse | None,
        score: float | None,
        cause: Exception,
    ) -> InferResponse:
        if local_response is None:
            if local is None or not local.runtime.ready:
                if isinstance(cause, CloudTooLargeError):
                    raise cause  # 413 to the caller: nothing here can serve it either
                raise CloudUnavailableError(
                    f"model {self.name!r}: no local model, and the cloud failed: {cause}"
                ) from cause
            local_response, score = await self._run_local(local, request)
        assert local is not None
        self._stats.degraded += 1
        logger.debug("router %s: %s, served locally (degraded): %s", self.name, reason, cause)
        version = local.runtime.info.version
        response = self._tag(local_response, "edge", version, reason=reason, score=score)
        response.parameters[DEGRADED] = True
        response.parameters[DEGRADED_REASON] = _degraded_reason(cause)
        return response

    def _served_local(
        self, response: InferResponse, local: _Local, score: float | None
    ) -> InferResponse:
        self._stats.served_local += 1
        return self._tag(response, "edge", local.runtime.info.version, score=score)

    def _tag(
        self,
        response: InferResponse,
        served_by: str,
        version: str,
        *,
        reason: str | None = None,
        score: float | None = None,
    ) -> InferResponse:
        params = response.parameters
        params[SERVED_BY] = served_by
        params[MODEL_VERSION] = version
        if reason is not None:
            params[ESCALATION_REASON] = reason
        if score is not None:
            params[UNCERTAINTY] = score
        return replace(response, model=self.name, version=version, parameters=params)

    # --- the two paths ----------------------------------------------------------------

    async def _run_local(
        self, local: _Local, request: InferRequest
    ) -> tuple[InferResponse, float | None]:
        started = self.gauge.local_started()
        try:
            response = await local.runtime.infer(request)
        except BaseException:
            self.gauge.local_ended(started, ok=False)
            raise
        self._stats.latency["local"].add(self.gauge.local_ended(started))
        return response, _uncertainty(response, local.hints.uncertainty_metric)

    async def _call_cloud(self, request: InferRequest) -> InferResponse:
        if self.remote is None:
            raise CloudUnavailableError("no cloud endpoint is configured")
        if not self.breaker.allow():
            self._stats.circuit_rejections += 1
            raise CloudUnavailableError("the cloud circuit is open after repeated failures")
        call = self.gauge.cloud_started()
        try:
            response = await self._call_with_retry(self.remote, request)
        except CloudUnavailableError:
            self.gauge.cloud_ended(call, ok=False)
            self._stats.cloud_errors += 1
            self.breaker.failure()
            raise
        except InvalidInputError:
            self.gauge.cloud_ended(call, ok=False)
            self.breaker.success()  # it answered: the cloud is up, the request was bad
            raise
        except BaseException:
            self.gauge.cloud_ended(call, ok=False)
            self.breaker.release()
            raise
        self.breaker.success()
        self._stats.latency["cloud"].add(self.gauge.cloud_ended(call, ok=True))
        return response

    async def _call_with_retry(self, remote: Runtime, request: InferRequest) -> InferResponse:
        """One retry, after a jittered pause, when the cloud could not be reached at all."""
        try:
            return await remote.infer(request)
        except CloudConnectError as exc:
            delay = self.policy.retry_backoff_s * (0.5 + self._rng.random())
            logger.debug("cloud unreachable (%s); retrying in %.0f ms", exc, delay * 1000)
            await asyncio.sleep(delay)
            return await remote.infer(request)


def _degraded_reason(cause: Exception) -> str:
    """``fogline.degraded_reason``: why the cloud's answer is not the one given."""
    if isinstance(cause, CloudTooLargeError):
        return "cloud_too_large"  # the fallback's body limit is below this request
    if isinstance(cause, CloudUnavailableError):
        return "cloud_unavailable"  # unreachable, 5xx, timeout, open circuit, no endpoint
    return "cloud_refused"  # a 4xx for a request the local model could serve


def _route_of(request: InferRequest) -> str:
    route = request.parameters.get(ROUTE, "auto")
    if route not in ROUTES:
        raise InvalidInputError(f"parameter {ROUTE!r} must be one of {list(ROUTES)}, got {route!r}")
    return str(route)


def _rows(request: InferRequest) -> int:
    if not request.inputs:
        return 0
    data = request.inputs[0].data
    return int(data.shape[0]) if data.ndim else 1


def _uncertainty(response: InferResponse, metric: str) -> float | None:
    """The highest per-row score of the probabilities output, if there is one."""
    if metric == uncertainty.NO_METRIC:
        return None
    outputs = {t.name: t for t in response.outputs}
    probs = outputs.get("probabilities")
    if probs is None and len(response.outputs) == 1:
        probs = response.outputs[0]
    if probs is None or probs.data.dtype.kind != "f" or probs.data.ndim == 0 or not probs.data.size:
        return None
    rows = probs.data.reshape(-1, probs.data.shape[-1])
    return float(uncertainty.score(metric, rows).max())
