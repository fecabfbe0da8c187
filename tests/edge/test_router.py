"""The edge router and cloud client against a real fallback server and a real local model.

Only the outside world is faked: the clock (for the circuit breaker) and a few
tiny real aiohttp "clouds" that fail in chosen ways (503, dropped connection,
slow answer).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cloud.fallback import FallbackSettings, build_fallback_app
from common.errors import (
    CloudUnavailableError,
    FoglineError,
    InvalidInputError,
    ModelNotReadyError,
    http_status_of,
)
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
    Tensor,
    response_to_rest,
)
from common.manifest import RoutingHints
from common.onnx_runtime import OnnxRuntime
from common.v2_binary import decode_infer_request
from common.v2_server import BINARY_HEADER, DataPlane, build_v2_app
from edge.circuit_breaker import CircuitBreaker
from edge.cloud_client import CloudClient, CloudConnectError
from edge.load_gauge import LoadGauge
from edge.router import Router, RouterPolicy
from kernels import uncertainty
from tests.model_fixtures import Package, make_package, reference_output, toy_input, v2_infer_body

TOKEN = "edge-device-token"


def free_port() -> int:
    from fogline.broker import free_port as pick

    return pick()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(rows: int = 2, **params: Any) -> InferRequest:
    return InferRequest("toy", [Tensor("input", toy_input(rows))], parameters=params)


# --- fixtures: a real edge model, a real cloud -----------------------------------------


@pytest.fixture(scope="module")
def edge_pkg(tmp_path_factory: pytest.TempPathFactory) -> Package:
    return make_package(tmp_path_factory.mktemp("edge"), version="e1", seed=0)


@pytest.fixture(scope="module")
def cloud_pkg(tmp_path_factory: pytest.TempPathFactory) -> Package:
    return make_package(tmp_path_factory.mktemp("cloud"), version="c1", variant="cloud", seed=5)


@pytest.fixture
async def local(edge_pkg: Package) -> AsyncIterator[OnnxRuntime]:
    rt = OnnxRuntime(edge_pkg.model_path, edge_pkg.manifest)
    await rt.load()
    yield rt
    await rt.unload()


async def start_server(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def cloud(cloud_pkg: Package) -> AsyncIterator[TestServer]:
    settings = FallbackSettings(
        packages=[cloud_pkg.directory],
        trusted_keys=[cloud_pkg.signer.public_key_hex],
        tokens={TOKEN},
    )
    server = await start_server(await build_fallback_app(settings))
    yield server
    await server.close()


@pytest.fixture
async def routers() -> AsyncIterator[Callable[..., Awaitable[Router]]]:
    """Build loaded routers; unload them all at the end."""
    made: list[Router] = []

    async def make(
        url: str | None,
        local: OnnxRuntime | None,
        hints: RoutingHints | None = None,
        policy: RouterPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 2.0,
        token: str | None = TOKEN,
    ) -> Router:
        remote = CloudClient(url, "toy", token=token, timeout_s=timeout_s) if url else None
        router = Router("toy", remote, policy=policy, clock=clock)
        await router.load()
        router.set_local(local, hints or RoutingHints())
        made.append(router)
        return router

    yield make
    for r in made:
        await r.unload()


CONFIDENT = RoutingHints(uncertainty_threshold=1.0)  # never escalates on uncertainty
UNSURE = RoutingHints(uncertainty_threshold=0.0)  # always escalates


# --- routing decisions -----------------------------------------------------------------


async def test_confident_request_is_served_locally(
    cloud: TestServer, local: OnnxRuntime, edge_pkg: Package, routers: Any
) -> None:
    router = await routers(url_of(cloud), local, CONFIDENT)
    resp = await router.infer(request(3))
    p = resp.parameters
    assert p[SERVED_BY] == "edge" and p[MODEL_VERSION] == "e1" and resp.version == "e1"
    assert ESCALATION_REASON not in p and DEGRADED not in p
    want = reference_output(edge_pkg.model_path, toy_input(3))
    np.testing.assert_allclose(resp.output("probabilities").data, want, atol=1e-6)
    assert p[UNCERTAINTY] == pytest.approx(uncertainty.max_prob(want).max())


async def test_uncertain_request_escalates_to_cloud(
    cloud: TestServer, local: OnnxRuntime, cloud_pkg: Package, routers: Any
) -> None:
    score = float(uncertainty.max_prob(reference_output(local.model_path, toy_input(2))).max())
    router = await routers(url_of(cloud), local, RoutingHints(uncertainty_threshold=score - 1e-3))
    resp = await router.infer(request(2))
    p = resp.parameters
    assert p[SERVED_BY] == "cloud" and p[MODEL_VERSION] == "c1"
    assert p[ESCALATION_REASON] == "uncertain" and p[UNCERTAINTY] == pytest.approx(score)
    want = reference_output(cloud_pkg.model_path, toy_input(2))
    np.testing.assert_allclose(resp.output("probabilities").data, want, atol=1e-6)
    # Just above the score, the same request stays local.
    router.set_local(local, RoutingHints(uncertainty_threshold=score + 1e-3))
    assert (await router.infer(request(2))).parameters[SERVED_BY] == "edge"


async def test_entropy_metric(cloud: TestServer, local: OnnxRuntime, routers: Any) -> None:
    hints = RoutingHints(uncertainty_metric="entropy", uncertainty_threshold=1.0)
    router = await routers(url_of(cloud), local, hints)
    probs = reference_output(local.model_path, toy_input(2))
    resp = await router.infer(request(2))
    assert resp.parameters[UNCERTAINTY] == pytest.approx(uncertainty.entropy(probs).max())


async def test_no_metric_never_escalates_on_uncertainty(
    cloud: TestServer, local: OnnxRuntime, routers: Any
) -> None:
    """A regressor's package says "none": its outputs are not scored as probabilities."""
    hints = RoutingHints(uncertainty_metric=uncertainty.NO_METRIC, uncertainty_threshold=0.0)
    router = await routers(url_of(cloud), local, hints)
    resp = await router.infer(request(2))
    assert resp.parameters[SERVED_BY] == "edge"
    assert UNCERTAINTY not in resp.parameters


async def test_heavy_request_goes_to_cloud(
    cloud: TestServer, local: OnnxRuntime, routers: Any
) -> None:
    router = await routers(url_of(cloud), local, RoutingHints(max_local_batch=4))
    resp = await router.infer(request(8))
    assert resp.parameters[SERVED_BY] == "cloud"
    assert resp.parameters[ESCALATION_REASON] == "heavy"
    assert UNCERTAINTY not in resp.parameters  # the local model never ran
    assert resp.output("probabilities").data.shape == (8, 10)
    assert (await router.infer(request(4))).parameters[SERVED_BY] == "edge"


async def test_no_local_model_goes_to_cloud(cloud: TestServer, routers: Any) -> None:
    router = await routers(url_of(cloud), None)
    assert router.ready and router.local_version is None
    resp = await router.infer(request(1))
    assert resp.parameters[SERVED_BY] == "cloud"
    assert resp.parameters[ESCALATION_REASON] == "no_local_model"


async def test_unloaded_local_model_goes_to_cloud(
    cloud: TestServer, local: OnnxRuntime, routers: Any
) -> None:
    router = await routers(url_of(cloud), local, CONFIDENT)
    await local.unload()
    resp = await router.infer(request(1))
    assert resp.parameters[ESCALATION_REASON] == "no_local_model"


async def test_loaded_local_queue_sends_to_cloud(
    cloud: TestServer, edge_pkg: Package, routers: Any
) -> None:
    # A model that runs in worker threads (as any but the tiniest do), so requests queue.
    local = OnnxRuntime(edge_pkg.model_path, edge_pkg.manifest, inline_below_us=0.0)
    await local.load()
    router = await routers(url_of(cloud), local, CONFIDENT, RouterPolicy(local_budget_ms=1e-9))
    await router.infer(request(1))  # learn the local latency
    # The first runs locally; while it is in flight, the others see a queue past the budget.
    responses = await asyncio.gather(*(router.infer(request(1)) for _ in range(4)))
    reasons = [r.parameters.get(ESCALATION_REASON) for r in responses]
    # The second goes to the cloud (its latency unknown: this measures it); the others
    # follow only while that call is not already slower than this tiny model's queue.
    assert reasons[:2] == [None, "load"] and set(reasons[2:]) <= {None, "load"}
    served = [r.parameters[SERVED_BY] for r in responses]
    assert served == ["cloud" if r == "load" else "edge" for r in reasons]


async def test_forced_routes(cloud: TestServer, local: OnnxRuntime, routers: Any) -> None:
    router = await routers(url_of(cloud), local, UNSURE)
    resp = await router.infer(request(1, **{ROUTE: "local"}))
    assert resp.parameters[SERVED_BY] == "edge" and ESCALATION_REASON not in resp.parameters
    router.set_local(local, CONFIDENT)
    resp = await router.infer(request(1, **{ROUTE: "cloud"}))
    assert resp.parameters[SERVED_BY] == "cloud" and resp.parameters[ESCALATION_REASON] == "forced"
    with pytest.raises(InvalidInputError, match=r"fogline\.route"):
        await router.infer(request(1, **{ROUTE: "mars"}))


async def test_forced_local_without_local_model(cloud: TestServer, routers: Any) -> None:
    router = await routers(url_of(cloud), None)
    with pytest.raises(ModelNotReadyError):
        await router.infer(request(1, **{ROUTE: "local"}))


async def test_bad_input_forced_to_cloud_is_the_cloud_error(
    cloud: TestServer, local: OnnxRuntime, routers: Any
) -> None:
    router = await routers(url_of(cloud), local, CONFIDENT)
    bad = InferRequest(
        "toy", [Tensor("input", np.zeros((1, 5), np.float32))], parameters={ROUTE: "cloud"}
    )
    with pytest.raises(InvalidInputError, match="shape"):
        await router.infer(bad)
    assert router.breaker.state == "closed"  # the cloud answered; it is healthy


# --- the cloud failing -----------------------------------------------------------------


async def test_cloud_stopped_gives_degraded_local_answer(
    cloud_pkg: Package, local: OnnxRuntime, routers: Any
) -> None:
    settings = FallbackSettings(packages=[cloud_pkg.directory], tokens={TOKEN})
    server = await start_server(await build_fallback_app(settings))
    router = await routers(url_of(server), local, UNSURE)
    assert (await router.infer(request(1))).parameters[SERVED_BY] == "cloud"
    await server.close()
    start = time.monotonic()
    resp = await router.infer(request(2))
    assert time.monotonic() - start < 1.5  # refused at once, one quick retry, no hang
    p = resp.parameters
    assert p[SERVED_BY] == "edge" and p[DEGRADED] is True and p[MODEL_VERSION] == "e1"
    assert p[ESCALATION_REASON] == "uncertain"
    stats = router.stats()
    assert stats["degraded"] == 1 and stats["cloud_errors"] == 1


@pytest.mark.parametrize("reason_hints", [("heavy", RoutingHints(max_local_batch=1))])
async def test_closed_port_runs_local_when_it_had_not(
    local: OnnxRuntime, routers: Any, reason_hints: tuple[str, RoutingHints]
) -> None:
    reason, hints = reason_hints
    router = await routers(f"http://127.0.0.1:{free_port()}", local, hints)
    resp = await router.infer(request(3))
    assert resp.parameters[SERVED_BY] == "edge" and resp.parameters[DEGRADED] is True
    assert resp.parameters[ESCALATION_REASON] == reason
    assert resp.output("probabilities").data.shape == (3, 10)


async def test_no_local_and_no_cloud_is_cloud_unavailable(routers: Any) -> None:
    router = await routers(f"http://127.0.0.1:{free_port()}", None)
    with pytest.raises(CloudUnavailableError):
        await router.infer(request(1))
    no_remote = await routers(None, None)
    assert not no_remote.ready
    with pytest.raises(CloudUnavailableError):
        await no_remote.infer(request(1))


async def test_wrong_token_degrades(cloud: TestServer, local: OnnxRuntime, routers: Any) -> None:
    router = await routers(url_of(cloud), local, UNSURE, token="stolen?")
    resp = await router.infer(request(1))
    assert resp.parameters[DEGRADED] is True and resp.parameters[SERVED_BY] == "edge"


@dataclass
class FlakyCloud:
    """A tiny real V2 endpoint whose failure mode the test picks."""

    mode: str = "503"  # "503" | "ok" | "drop_once" | "slow"
    hits: int = 0
    seen: list[InferRequest] = field(default_factory=list)
    bodies: list[tuple[int, str | None]] = field(default_factory=list)  # size, binary header

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.mode == "503":
            return web.json_response(
                {"error": "overloaded"}, status=503, headers={"Retry-After": "1"}
            )
        if self.mode == "drop_once":
            self.mode = "ok"
            assert request.transport is not None
            request.transport.close()  # the connection dies mid-request
            return web.Response()
        if self.mode == "slow":
            await asyncio.sleep(5)
        header = request.headers.get(BINARY_HEADER)
        body = await request.read()
        self.bodies.append((len(body), header))
        sent, _ = decode_infer_request(body, int(header) if header else None, "toy", None)
        self.seen.append(sent)
        rows = sent.inputs[0].shape[0]
        probs = np.full((rows, 10), 0.1, np.float32)
        answer = InferResponse(
            "toy",
            [Tensor("probabilities", probs)],
            version="c9",
            parameters={SERVED_BY: "cloud", MODEL_VERSION: "c9"},
        )
        return web.json_response(response_to_rest(answer))


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[FlakyCloud, str]]:
    state = FlakyCloud()
    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", state.handle)
    server = await start_server(app)
    yield state, url_of(server)
    await server.close()


async def test_503_is_not_retried_and_degrades(
    flaky: tuple[FlakyCloud, str], local: OnnxRuntime, routers: Any
) -> None:
    cloud, url = flaky
    router = await routers(url, local, UNSURE)
    resp = await router.infer(request(1))
    assert resp.parameters[DEGRADED] is True and cloud.hits == 1


async def test_dropped_connection_is_retried_once(
    flaky: tuple[FlakyCloud, str], local: OnnxRuntime, routers: Any
) -> None:
    cloud, url = flaky
    cloud.mode = "drop_once"
    router = await routers(url, local, UNSURE)
    resp = await router.infer(request(1))
    assert resp.parameters[SERVED_BY] == "cloud" and resp.parameters[MODEL_VERSION] == "c9"
    assert cloud.hits == 2


async def test_slow_cloud_times_out_and_degrades(
    flaky: tuple[FlakyCloud, str], local: OnnxRuntime, routers: Any
) -> None:
    cloud, url = flaky
    cloud.mode = "slow"
    router = await routers(url, local, UNSURE, timeout_s=0.3)
    start = time.monotonic()
    resp = await router.infer(request(1))
    assert time.monotonic() - start < 2.0
    assert resp.parameters[DEGRADED] is True and cloud.hits == 1  # a timeout is not retried


async def test_circuit_breaker_opens_and_half_opens(
    flaky: tuple[FlakyCloud, str], local: OnnxRuntime, routers: Any
) -> None:
    cloud, url = flaky
    clock = FakeClock()
    policy = RouterPolicy(breaker_failures=3, breaker_cooldown_s=10.0)
    router = await routers(url, local, UNSURE, policy=policy, clock=clock)

    for _ in range(3):
        assert (await router.infer(request(1))).parameters[DEGRADED] is True
    assert cloud.hits == 3 and router.breaker.state == "open"

    assert (await router.infer(request(1))).parameters[DEGRADED] is True
    assert cloud.hits == 3  # open: the cloud is not even asked
    clock.now += 9.9
    await router.infer(request(1))
    assert cloud.hits == 3

    clock.now += 0.1  # cooldown over: one trial, which fails and reopens the circuit
    assert (await router.infer(request(1))).parameters[DEGRADED] is True
    assert cloud.hits == 4 and router.breaker.state == "open"

    cloud.mode = "ok"
    await router.infer(request(1))
    assert cloud.hits == 4  # still cooling down
    clock.now += 10.0
    resp = await router.infer(request(1))
    assert resp.parameters[SERVED_BY] == "cloud" and router.breaker.state == "closed"
    assert (await router.infer(request(1))).parameters[SERVED_BY] == "cloud"
    assert cloud.hits == 6
    stats = router.stats()
    assert stats["cloud_errors"] == 4 and stats["circuit_rejections"] == 3


def test_half_open_admits_one_trial() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, cooldown_s=5, clock=clock)
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 5
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.release()  # the trial was cancelled: let another try
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


# --- swaps, info, stats ----------------------------------------------------------------


async def test_set_local_swaps_version(
    cloud: TestServer, local: OnnxRuntime, edge_pkg: Package, routers: Any
) -> None:
    from dataclasses import replace

    router = await routers(url_of(cloud), local, CONFIDENT)
    assert router.local_version == "e1" and router.info.version == "e1"
    newer = OnnxRuntime(edge_pkg.model_path, replace(edge_pkg.manifest, version="e2"))
    await newer.load()
    router.set_local(newer, CONFIDENT)
    assert router.local_version == "e2" and router.info.name == "toy"
    assert (await router.infer(request(1))).parameters[MODEL_VERSION] == "e2"
    router.set_local(None)
    assert router.local_version is None and router.info.version == "e2"  # last known
    with pytest.raises(InvalidInputError, match="metric"):
        router.set_local(newer, RoutingHints(uncertainty_metric="vibes"))


async def test_stats(cloud: TestServer, local: OnnxRuntime, routers: Any) -> None:
    router = await routers(url_of(cloud), local, RoutingHints(max_local_batch=2))
    await router.infer(request(1))
    await router.infer(request(1))
    await router.infer(request(5))
    stats = router.stats(reset=True)
    assert stats["requests"] == 3 and stats["served_local"] == 2 and stats["served_cloud"] == 1
    assert stats["escalated"] == {"heavy": 1} and stats["degraded"] == 0
    latency = stats["latency_ms"]
    assert isinstance(latency, dict)
    assert latency["total"]["count"] == 3 and latency["local"]["count"] == 2
    assert latency["cloud"]["count"] == 1 and latency["cloud"]["p95_ms"] > 0
    assert router.stats()["requests"] == 0


# --- the router behind the edge's local V2 API -----------------------------------------


async def test_local_api_wiring(cloud: TestServer, local: OnnxRuntime, routers: Any) -> None:
    router = await routers(url_of(cloud), local, CONFIDENT)
    dataplane = DataPlane("fogline-edge", "test")
    dataplane.register(router)
    client = TestClient(TestServer(build_v2_app(dataplane), host="127.0.0.1"))
    await client.start_server()
    try:
        meta = await (await client.get("/v2/models/toy")).json()
        assert meta["versions"] == ["e1"]
        body = v2_infer_body(1, **{ROUTE: "cloud"})
        doc = await (await client.post("/v2/models/toy/infer", json=body)).json()
        assert doc["parameters"][SERVED_BY] == "cloud" and doc["model_name"] == "toy"
        await _binary_request_through_edge_to_cloud(client)
        router.set_local(None)
        await cloud.close()
        resp = await client.post("/v2/models/toy/infer", json=body)
        assert resp.status == 502 and "cloud" in (await resp.json())["error"]
    finally:
        await client.close()


async def _binary_request_through_edge_to_cloud(client: TestClient) -> None:
    """tritonclient's binary defaults at the edge (the hop to the cloud is binary too)."""
    x = toy_input(2)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True, ROUTE: "cloud"},
        }
    ).encode()
    resp = await client.post(
        "/v2/models/toy/infer", data=header + x.tobytes(), headers={BINARY_HEADER: str(len(header))}
    )
    assert resp.status == 200, await resp.text()
    raw = await resp.read()
    n = int(resp.headers[BINARY_HEADER])
    doc = json.loads(raw[:n])
    assert doc["parameters"][SERVED_BY] == "cloud"
    assert np.frombuffer(raw[n:], "<f4").shape == (20,)


# --- large requests ---------------------------------------------------------------------


async def test_request_too_large_for_the_cloud_is_answered_locally(
    cloud_pkg: Package, local: OnnxRuntime, edge_pkg: Package, routers: Any
) -> None:
    """Issue 5: a heavy request over the fallback's body limit got 400 ("cloud refused (413)")."""
    settings = FallbackSettings(
        packages=[cloud_pkg.directory],
        trusted_keys=[cloud_pkg.signer.public_key_hex],
        tokens={TOKEN},
        max_body_bytes=4096,
    )
    server = await start_server(await build_fallback_app(settings))
    try:
        router = await routers(url_of(server), local, RoutingHints(max_local_batch=2))
        resp = await router.infer(request(20))  # 20 rows x 256 bytes: over 4096
        p = resp.parameters
        assert p[SERVED_BY] == "edge" and p[DEGRADED] is True
        assert p[DEGRADED_REASON] == "cloud_too_large" and p[ESCALATION_REASON] == "heavy"
        want = reference_output(edge_pkg.model_path, toy_input(20))
        np.testing.assert_allclose(resp.output("probabilities").data, want, atol=1e-6)
        assert (await router.infer(request(4))).parameters[SERVED_BY] == "cloud"  # fits
        assert router.breaker.state == "closed"  # a size refusal is not a cloud failure
        router.set_local(None)  # nothing local either: the caller hears 413
        with pytest.raises(InvalidInputError, match="size") as err:
            await router.infer(request(20))
        assert http_status_of(err.value) == 413
    finally:
        await server.close()


async def test_requests_reach_the_cloud_as_binary(
    flaky: tuple[FlakyCloud, str], local: OnnxRuntime, routers: Any
) -> None:
    """Raw tensor bytes after a JSON header: not ~5x larger JSON numbers."""
    cloud, url = flaky
    cloud.mode = "ok"
    router = await routers(url, local, UNSURE)
    x = toy_input(50)
    resp = await router.infer(InferRequest("toy", [Tensor("input", x)]))
    assert resp.parameters[SERVED_BY] == "cloud"
    [(size, header)] = cloud.bodies
    assert header is not None and size == int(header) + x.nbytes
    np.testing.assert_array_equal(cloud.seen[0].inputs[0].data, x)


async def test_large_request_to_the_cloud_does_not_stall_the_event_loop(
    cloud: TestServer, local: OnnxRuntime, routers: Any
) -> None:
    """Issue 5: a 12 MiB request re-encoded as JSON stalled the agent's loop for 4.3 s."""
    router = await routers(url_of(cloud), local, RoutingHints(max_local_batch=1), timeout_s=60)
    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    try:
        x = np.random.default_rng(0).standard_normal((12 * 4096, 64)).astype(np.float32)
        resp = await router.infer(InferRequest("toy", [Tensor("input", x)]))  # 12 MiB
    finally:
        beat.cancel()
    assert resp.parameters[SERVED_BY] == "cloud" and resp.outputs[0].data.shape == (49152, 10)
    assert max(gaps) < 1.0, max(gaps)  # generous: encoding 12 MiB as JSON took seconds


# --- the cloud client on its own -------------------------------------------------------


async def test_cloud_client_session_ownership(cloud: TestServer) -> None:
    async with aiohttp.ClientSession() as session:
        shared = CloudClient(url_of(cloud), "toy", token=TOKEN, session=session)
        await shared.load()
        assert shared.ready
        await shared.infer(request(1))
        await shared.unload()
        assert not session.closed  # not ours to close
    own = CloudClient(url_of(cloud), "toy", token=TOKEN)
    assert not own.ready
    with pytest.raises(CloudUnavailableError, match="not loaded"):
        await own.infer(request(1))
    await own.load()
    info = await own.metadata()
    assert info.version == "c1" and info.inputs[0].shape == [-1, 64]
    await own.unload()
    assert not own.ready


async def test_cloud_client_errors(cloud: TestServer, flaky: tuple[FlakyCloud, str]) -> None:
    client = CloudClient(url_of(cloud), "ghost", token=TOKEN)
    await client.load()
    try:
        with pytest.raises(CloudUnavailableError, match="404"):
            await client.infer(request(1))
    finally:
        await client.unload()
    refused = CloudClient(f"http://127.0.0.1:{free_port()}", "toy")
    await refused.load()
    try:
        with pytest.raises(CloudConnectError):
            await refused.infer(request(1))
    finally:
        await refused.unload()


def test_edge_modules_do_not_import_torch_or_cloud(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; import edge.router, edge.cloud_client, common.v2_server; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'cloud')]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


@pytest.mark.parametrize("status", [200, 400, 413, 503])
async def test_a_deeply_nested_cloud_answer_degrades_not_500(
    status: int, local: OnnxRuntime, routers: Any
) -> None:
    """Red team: the agent parsed a cloud's error body (and metadata) with bare
    ``json.loads``; a hostile or intercepted fallback answering 100,000 nested ``[``
    raised RecursionError out of the router: a 500 to the device's own caller."""
    deep = b"[" * 100_000 + b"]" * 100_000

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=deep, status=status, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", answer)
    app.router.add_get("/v2/models/{model}", answer)
    server = await start_server(app)
    try:
        router = await routers(url_of(server), local, UNSURE)
        try:
            resp = await router.infer(request(1))
        except FoglineError:  # a refusal passed on is fine; a RecursionError is not
            return
        assert resp.parameters[DEGRADED] is True and resp.parameters[SERVED_BY] == "edge"
    finally:
        await server.close()


def test_load_gauge_offloads_only_while_the_cloud_beats_the_queue() -> None:
    """The decision alone, on a fake clock: queue past the budget, cloud faster or not,
    and one probe per interval when what is known of the cloud is stale."""
    now = [0.0]
    gauge = LoadGauge(lambda: now[0])
    assert not gauge.offload(5.0, 60.0)  # nothing measured yet: no queue known
    gauge.local_ms, gauge.local_inflight = 10.0, 3  # 30 ms expected wait
    assert not gauge.offload(50.0, 60.0)  # within the budget
    assert gauge.offload(5.0, 60.0)  # cloud unknown: this request measures it
    gauge.cloud_ended(gauge.cloud_started(), ok=True)  # a fast answer: now known
    assert gauge.offload(5.0, 60.0)  # faster than 30 ms wait + 10 ms service
    gauge.cloud_ms = 500.0  # the cloud became slow
    assert not gauge.offload(5.0, 60.0)
    now[0] = 61.0  # stale: exactly one request goes to measure it again
    assert gauge.offload(5.0, 60.0)
    assert not gauge.offload(5.0, 60.0)
