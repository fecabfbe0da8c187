"""The V2 (KServe/Triton Open Inference Protocol) REST layer.

Shared by the edge agent's local API and the cloud fallback. Three layers, as
in MLServer: aiohttp handlers do HTTP only (parse, map status codes) and hand
over to the transport-neutral ``DataPlane``, which finds the runtime and calls
``infer``. One middleware maps every error to ``{"error": "..."}`` through
``common.errors.http_status_of``.

JSON tensors and the binary tensor extension (``Inference-Header-Content-Length``)
are both accepted, so tritonclient's defaults work unchanged.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web
from prometheus_client.core import Metric

from common import tracing
from common.batch_settings import DEADLINE_HEADER, DEADLINE_PARAM, deadline_ms
from common.dataplane import DataPlane
from common.errors import (
    AuthError,
    DeadlineExceededError,
    FoglineError,
    InvalidInputError,
    ModelNotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    http_status_of,
)
from common.inference import ESCALATION_REASON, SERVED_BY, InferRequest, InferResponse
from common.memory import TRIM_AFTER_BYTES, release_free_memory
from common.request_body import ByteBudget, RequestLimits, read_body
from common.serving_metrics import CONTENT_TYPE, UNKNOWN_MODEL, ServingMetrics, counter, gauge
from common.v2_binary import (
    BINARY_HEADER,
    decode_infer_request,
    encode_infer_response,
)

logger = logging.getLogger(__name__)

_OFFLOAD_BYTES = 1 << 16  # (de)serialise bodies larger than this off the event loop
_PUBLIC_ROUTES = frozenset({"v2.health.live", "v2.health.ready", "metrics"})
_INFER_ROUTES = frozenset({"v2.infer", "v2.version.infer"})


class InflightGate:
    """Admits at most ``limit`` concurrent infers; past that, sheds load at once."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError("max_inflight must be at least 1")
        self.limit = limit
        self.inflight = 0
        self.shed = 0

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.limit is not None and self.inflight >= self.limit:
            self.shed += 1
            raise OverloadedError(f"server is at its limit of {self.limit} concurrent requests")
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1


@dataclass
class V2State:
    dataplane: DataPlane
    gate: InflightGate
    auth_tokens: frozenset[str] | None
    limits: RequestLimits = field(default_factory=RequestLimits)
    budget: ByteBudget = field(init=False)
    # Accepts a bearer token that is not one of auth_tokens (a signed device token),
    # or raises AuthError. It may be async (one that asks another service, cached).
    token_verifier: Callable[[str], object] | None = None

    def __post_init__(self) -> None:
        self.budget = ByteBudget(self.limits.decode_budget)

    @property
    def metrics(self) -> ServingMetrics:
        return self.dataplane.metrics

    def collect(self) -> Iterator[Metric]:
        """This server's own gauges and counters, read at scrape time."""
        gate, budget = self.gate, self.budget
        yield gauge("fogline_v2_inflight", "Inference requests being served now.", gate.inflight)
        yield counter(
            "fogline_v2_shed", "Inference requests refused with 503 (overload).", gate.shed
        )
        yield gauge(
            "fogline_v2_request_bytes",
            "Request body bytes held now (read, decoded, served).",
            budget.used,
        )
        yield counter(
            "fogline_v2_bytes_shed", "Requests refused with 503 past the byte budget.", budget.shed
        )

    @property
    def auth_required(self) -> bool:
        return self.auth_tokens is not None or self.token_verifier is not None


V2_STATE = web.AppKey("fogline.v2", V2State)


def build_v2_app(
    dataplane: DataPlane,
    *,
    auth_tokens: set[str] | None = None,
    token_verifier: Callable[[str], object] | None = None,
    max_inflight: int | None = None,
    client_max_size: int | None = None,
    limits: RequestLimits | None = None,
) -> web.Application:
    """An aiohttp app serving ``dataplane`` over V2 REST, plus ``GET /metrics``.

    To serve more routes beside V2 (an agent's admin API, say), add them to the
    returned app before it starts; the error middleware then covers them too,
    auth covers every ``/v2`` path except health, and their bodies are held to
    ``limits.max_small_body``. ``client_max_size`` (the largest infer body) is
    kept for callers that set only that.
    """
    limits = limits or RequestLimits()
    if client_max_size is not None:
        budget = max(limits.decode_budget, client_max_size)
        limits = replace(limits, max_body=client_max_size, decode_budget=budget)
    middlewares = [error_middleware, _metrics_middleware, _auth_middleware, _small_body]
    if tracing.enabled():  # decided once: no per-request cost when tracing is off
        middlewares.insert(1, _trace_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=limits.max_small_body)
    tokens = frozenset(auth_tokens) if auth_tokens is not None else None
    state = V2State(
        dataplane, InflightGate(max_inflight), tokens, limits, token_verifier=token_verifier
    )
    app[V2_STATE] = state
    dataplane.metrics.add_collector("v2", state.collect)
    r = app.router
    r.add_get("/v2/health/live", _live, name="v2.health.live")
    r.add_get("/v2/health/ready", _ready, name="v2.health.ready")
    r.add_get("/v2", _server_metadata, name="v2.server")
    r.add_get("/v2/models", _model_index, name="v2.models")
    r.add_get("/v2/models/{model}", _model_metadata, name="v2.model")
    r.add_get("/v2/models/{model}/versions/{version}", _model_metadata, name="v2.version")
    r.add_get("/v2/models/{model}/ready", _model_ready, name="v2.ready")
    r.add_get("/v2/models/{model}/versions/{version}/ready", _model_ready, name="v2.version.ready")
    r.add_post("/v2/models/{model}/infer", _infer, name="v2.infer")
    r.add_post("/v2/models/{model}/versions/{version}/infer", _infer, name="v2.version.infer")
    r.add_get("/metrics", _metrics, name="metrics")
    return app


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The one place errors become HTTP: ``{"error": ...}`` with the mapped status."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(
            {"error": exc.text or exc.reason}, status=exc.status, headers=allow
        )
    except Exception as exc:
        status = http_status_of(exc)
        if isinstance(exc, FoglineError):
            logger.debug("%s %s -> %d: %s", request.method, request.path, status, exc)
            return web.json_response({"error": str(exc)}, status=status, headers=_headers_for(exc))
        logger.exception("unexpected error serving %s %s", request.method, request.path)
        return web.json_response({"error": "internal server error"}, status=status)


def _headers_for(exc: FoglineError) -> dict[str, str] | None:
    if isinstance(exc, AuthError):
        return {"WWW-Authenticate": "Bearer"}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        return {"Retry-After": str(retry_after)}
    if isinstance(exc, ModelNotReadyError):
        return {"Retry-After": "1"}
    return None


@web.middleware
async def _metrics_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.match_info.route.name not in _INFER_ROUTES:
        return await handler(request)
    state = request.app[V2_STATE]
    start = time.perf_counter()
    status = 499  # the client went away before an answer (nginx's convention)
    reason: str | None = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except Exception as exc:
        status = http_status_of(exc)
        reason = "deadline" if isinstance(exc, DeadlineExceededError) else None
        raise
    finally:
        # Unknown names share one label, so callers cannot grow the metric without bound.
        model, version = _metric_labels(state.dataplane, request)
        state.metrics.observe_request(
            model, version, status, time.perf_counter() - start, reason=reason
        )


def _metric_labels(dataplane: DataPlane, request: web.Request) -> tuple[str, str]:
    name = request.match_info["model"]
    try:
        info = dataplane.get(name, request.match_info.get("version")).info
    except FoglineError:
        return UNKNOWN_MODEL, ""
    return info.name, info.version


@web.middleware
async def _trace_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """A server span per inference request, the child of the caller's ``traceparent``."""
    route = request.match_info.route
    if route.name not in _INFER_ROUTES or route.resource is None:
        return await handler(request)  # health, metadata and metrics: never traced
    attributes = {
        "http.request.method": request.method,
        "http.route": route.resource.canonical,
        "fogline.model": request.match_info["model"],
        "fogline.server": request.app[V2_STATE].dataplane.server_name,
    }
    name = f"{request.method} {route.resource.canonical}"
    with tracing.span(name, kind="server", carrier=request.headers, attributes=attributes):
        response = await handler(request)
        tracing.annotate({"http.response.status_code": response.status})
        return response


@web.middleware
async def _auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    state = request.app[V2_STATE]
    route = request.match_info.route.name
    if state.auth_required and request.path.startswith("/v2") and route not in _PUBLIC_ROUTES:
        await _check_bearer(request.headers.get("Authorization", ""), state)
    return await handler(request)


@web.middleware
async def _small_body(request: web.Request, handler: Any) -> web.StreamResponse:
    """Routes other than infer take small bodies: refuse a large one before reading it."""
    limit = request.app[V2_STATE].limits.max_small_body
    route = request.match_info.route.name
    size = request.content_length
    if route not in _INFER_ROUTES and size is not None and size > limit:
        raise PayloadTooLargeError(f"body of {size} bytes is over this route's limit of {limit}")
    return await handler(request)


async def _check_bearer(header: str, state: V2State) -> None:
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing 'Authorization: Bearer <token>' header")
    # compare_digest against every token: the time taken does not reveal which matched.
    tokens = state.auth_tokens or frozenset()
    if any(hmac.compare_digest(token.encode(), t.encode()) for t in tokens):
        return
    if state.token_verifier is None:
        raise AuthError("invalid bearer token")
    if inspect.isawaitable(verdict := state.token_verifier(token)):  # raises AuthError
        await verdict


def _model_ref(request: web.Request) -> tuple[str, str | None]:
    return request.match_info["model"], request.match_info.get("version")


async def _live(request: web.Request) -> web.Response:
    live = request.app[V2_STATE].dataplane.live()
    return web.json_response({"live": live}, status=200 if live else 503)


async def _ready(request: web.Request) -> web.Response:
    # 503, as KServe does: V2 clients only test for 200, load balancers want a 5xx.
    ready = request.app[V2_STATE].dataplane.ready()
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def _server_metadata(request: web.Request) -> web.Response:
    return web.json_response(request.app[V2_STATE].dataplane.server_metadata())


async def _model_index(request: web.Request) -> web.Response:
    return web.json_response({"models": request.app[V2_STATE].dataplane.model_index()})


async def _model_metadata(request: web.Request) -> web.Response:
    return web.json_response(request.app[V2_STATE].dataplane.model_metadata(*_model_ref(request)))


async def _model_ready(request: web.Request) -> web.Response:
    model, version = _model_ref(request)
    ready = request.app[V2_STATE].dataplane.model_ready(model, version)
    return web.json_response({"name": model, "ready": ready}, status=200 if ready else 503)


async def _infer(request: web.Request) -> web.StreamResponse:
    state = request.app[V2_STATE]
    limits = state.limits
    model, version = _model_ref(request)
    header = _header_length(request)
    with state.budget.hold() as hold:
        # NOTE: the body is read before the gate: a slow body must never hold a slot.
        body = await read_body(
            request, limit=limits.max_body, timeout_s=limits.body_timeout_s, hold=hold
        )
        with state.gate.admit():
            infer_request, binary = await _offload(
                len(body), decode_infer_request, body, header, model, version, limits.json
            )
            del body  # binary tensors keep their own view of it; the rest can go
            _deadline_from_header(request, infer_request)
            with tracing.span(f"infer {model}", attributes={"fogline.model": model}):
                response = await state.dataplane.infer(infer_request)
                tracing.annotate_response(response.parameters)
            _count_served(state, request, response)
        del infer_request
        size = sum(t.data.nbytes for t in response.outputs)
        large = hold.taken >= TRIM_AFTER_BYTES
        # NOTE: no local names the payload, so _answer can let go of it once it is sent.
        answer = _answer(
            request,
            *await _offload(size, encode_infer_response, response, binary),
            give_back=large,
        )
        del response
    return await answer


async def _answer(
    request: web.Request, payload: bytes, header_length: int | None, *, give_back: bool
) -> web.StreamResponse:
    """Send the answer; after a large request, give its memory back once it is sent."""
    if not give_back:
        # One write for headers and body (a StreamResponse sends its headers alone first:
        # a second syscall per request, about 8% of a small model's serving time).
        answer = web.Response(body=payload)
        _answer_type(answer, header_length)
        return answer
    response = web.StreamResponse()
    _answer_type(response, header_length)
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(payload)
    del payload
    await response.write_eof()
    await asyncio.to_thread(release_free_memory)
    return response


def _answer_type(response: web.StreamResponse, header_length: int | None) -> None:
    if header_length is None:
        response.content_type = "application/json"
    else:
        response.content_type = "application/octet-stream"
        response.headers[BINARY_HEADER] = str(header_length)


async def _offload(size: int, fn: Any, *args: Any) -> Any:
    """Run a codec function inline when small, in a worker thread when large."""
    if size > _OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _header_length(request: web.Request) -> int | None:
    value = request.headers.get(BINARY_HEADER)
    if value is None:
        return None
    # isascii: "²".isdigit() is true and int() refuses it; 18 digits: no huge ints to parse.
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise InvalidInputError(f"{BINARY_HEADER} must be a byte count, got {value!r}")
    return int(value)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[V2_STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


_SERVED_BY = frozenset({"edge", "cloud"})
_REASONS = frozenset({"", "uncertain", "heavy", "busy", "no_local_model"})


def _count_served(state: V2State, request: web.Request, response: InferResponse) -> None:
    """``fogline_requests_served``: by whom, and why escalated (labels from fixed sets)."""
    params = response.parameters
    served_by = params.get(SERVED_BY)
    if not isinstance(served_by, str):
        return
    reason = params.get(ESCALATION_REASON, "")
    model = _metric_labels(state.dataplane, request)[0]
    state.metrics.observe_served(
        model,
        served_by if served_by in _SERVED_BY else "other",
        reason if isinstance(reason, str) and reason in _REASONS else "other",
    )


def _deadline_from_header(request: web.Request, infer_request: InferRequest) -> None:
    """The ``fogline-deadline-ms`` header, when given, wins over the body's parameter.
    (Only a batching runtime can honour one: the others answer as soon as they can.)"""
    value = request.headers.get(DEADLINE_HEADER)
    if value is not None:
        infer_request.parameters[DEADLINE_PARAM] = value
    deadline_ms(infer_request)  # a bad one is a 400 on every server, batched or not
