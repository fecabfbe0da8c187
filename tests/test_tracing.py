"""OpenTelemetry traces across an escalation: a real agent and a real fallback (both
in-process aiohttp servers on loopback, a real Mosquitto, real ONNX Runtime), spans
caught by the SDK's in-memory exporter; and nothing of opentelemetry when it is off."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from cloud.fallback import FallbackSettings, build_fallback_app
from common import tracing
from common.inference import ESCALATION_REASON, MODEL_VERSION, ROUTE, SERVED_BY
from common.signing import Signer
from edge.agent import EdgeAgent
from tests.edge.agent_harness import agent_config
from tests.fogline_cli import fogline_without
from tests.model_fixtures import make_package, v2_infer_body
from tests.server_processes import ROOT, install_active

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

TOKEN = "fallback-token"
APP_TRACE = "0af7651916cd43dd8448eb211c80319c"  # the app's own trace, as in the W3C spec
APP_SPAN = "b7ad6b7169203331"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use(provider)
    yield memory
    tracing.use(None)
    provider.shutdown()


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_spans_the_app_agent_escalation_and_fallback(
    mosquitto, tmp_path, exporter: InMemorySpanExporter
) -> None:
    signer = Signer.generate()
    cloud = make_package(tmp_path / "cloud", version="c1", variant="cloud", seed=3, signer=signer)
    edge = make_package(tmp_path / "edge", version="1", signer=signer)
    fallback = TestServer(
        await build_fallback_app(
            FallbackSettings(
                packages=[cloud.directory], trusted_keys=[signer.public_key_hex], tokens={TOKEN}
            )
        ),
        host="127.0.0.1",
    )
    await fallback.start_server()
    config = agent_config(
        tmp_path,
        "cam-1",
        mosquitto,
        signer.public_key_hex,
        cloud_url=str(fallback.make_url("")).rstrip("/"),
        cloud_token=TOKEN,
    )
    install_active(config, edge)
    url = f"http://127.0.0.1:{config.api_port}"
    app_headers = {"traceparent": f"00-{APP_TRACE}-{APP_SPAN}-01"}
    try:
        async with EdgeAgent(config), aiohttp.ClientSession() as s:
            for base in (url, str(fallback.make_url("")).rstrip("/")):  # probes: never traced
                for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
                    async with s.get(base + path, headers=app_headers) as resp:
                        assert resp.status == 200, path
            assert exporter.get_finished_spans() == ()

            body = v2_infer_body(2, **{ROUTE: "cloud"})
            async with s.post(f"{url}/v2/models/toy/infer", json=body, headers=app_headers) as r:
                assert r.status == 200, await r.text()
                answer = await r.json()
            assert answer["parameters"][SERVED_BY] == "cloud"
            escalated = exporter.get_finished_spans()
            exporter.clear()

            # A caller's malformed trace headers are ignored: a trace of its own, still served.
            bad = {"traceparent": f"00-{'0' * 32}-{APP_SPAN}-01", "tracestate": "x" * 8000}
            infer_url = f"{url}/v2/models/toy/infer"
            async with s.post(infer_url, json=v2_infer_body(1), headers=bad) as r:
                assert r.status == 200
            local = exporter.get_finished_spans()
    finally:
        await fallback.close()

    route = "POST /v2/models/{model}/infer"
    chain = _chain(escalated)
    assert [s.name for s in chain] == [
        route, "infer toy", "escalate", "POST fallback", route, "infer toy"
    ]  # fmt: skip
    agent_server, agent_infer, escalate, client, cloud_server, cloud_infer = chain
    assert {s.context.trace_id for s in chain} == {int(APP_TRACE, 16)}  # the app's trace
    assert _parent(agent_server) == int(APP_SPAN, 16) and agent_server.parent.is_remote
    assert cloud_server.parent is not None and cloud_server.parent.is_remote  # by traceparent
    assert _parent(cloud_server) == client.context.span_id
    kinds = [s.kind.name for s in chain]
    assert kinds == ["SERVER", "INTERNAL", "INTERNAL", "CLIENT", "SERVER", "INTERNAL"]
    assert agent_server.attributes["fogline.server"] == "fogline-edge"
    assert cloud_server.attributes["fogline.server"] == "fogline-fallback"
    assert agent_server.attributes["http.response.status_code"] == 200
    assert client.attributes["http.response.status_code"] == 200
    assert agent_infer.attributes[SERVED_BY] == "cloud"
    assert agent_infer.attributes[MODEL_VERSION] == "c1"
    assert agent_infer.attributes[ESCALATION_REASON] == "forced"
    assert escalate.attributes[ESCALATION_REASON] == "forced"
    assert cloud_infer.attributes[SERVED_BY] == "cloud"
    assert cloud_infer.attributes[MODEL_VERSION] == "c1"
    assert ESCALATION_REASON not in cloud_infer.attributes

    # Served at the edge: no escalation span, a trace of its own (an all-zero trace id is
    # invalid in W3C trace context).
    server, infer = _chain(local)
    assert server.parent is None and infer.attributes[SERVED_BY] == "edge"
    assert infer.attributes[MODEL_VERSION] == "1" and ESCALATION_REASON not in infer.attributes
    assert server.context.trace_id != int(APP_TRACE, 16)


def _chain(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    """The spans from the root down, each the child of the one before (one per level)."""
    by_parent = {_parent(s): s for s in spans}
    assert len(by_parent) == len(spans), "a span with two children"
    roots = [s for s in spans if _parent(s) not in {x.context.span_id for x in spans}]
    assert len(roots) == 1
    chain = [roots[0]]
    while (child := by_parent.get(chain[-1].context.span_id)) is not None:
        chain.append(child)
    assert len(chain) == len(spans)
    return chain


def test_tracing_off_imports_nothing_of_opentelemetry() -> None:
    code = """
import sys
import fogline.cli, edge.agent, cloud.fallback, common.v2_server
from common.dataplane import DataPlane
common.v2_server.build_v2_app(DataPlane("x", "1"))
fogline.cli.build_parser()
leaked = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
sys.exit(f"imported: {leaked}" if leaked else 0)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_trace_without_the_extra_says_what_to_install(tmp_path) -> None:
    config = tmp_path / "agent.json"
    config.write_text("{}")
    asked = fogline_without(["opentelemetry"], "--trace", "edge", "health", "--config", str(config))
    assert asked.returncode == 1 and asked.stdout == ""
    assert asked.stderr == (
        "error: --trace: tracing needs the otel extra (opentelemetry is missing): "
        "pip install 'fogline[otel]'\n"
    )
    # Asked by a fleet-wide environment only: a warning, and the command runs on.
    by_env = fogline_without(
        ["opentelemetry"],
        "edge",
        "health",
        "--config",
        str(config),
        env={"OTEL_TRACES_EXPORTER": "otlp"},
    )
    assert "not tracing" in by_env.stderr and "fogline[otel]" in by_env.stderr
    assert by_env.stderr.splitlines()[-1].startswith("error: agent config: missing required")


def test_setup_exports_spans_with_the_service_name(tmp_path) -> None:
    code = """
from common import tracing
tracing.setup("fogline-test", {"OTEL_TRACES_EXPORTER": "console"})
with tracing.span("hello", attributes={"fogline.model": "toy", "skipped": None}):
    pass
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    span = json.loads(result.stderr[result.stderr.index("{") :])
    assert span["name"] == "hello" and span["attributes"] == {"fogline.model": "toy"}
    assert span["resource"]["attributes"]["service.name"] == "fogline-test"


def test_huge_attribute_values_are_cut(exporter: InMemorySpanExporter) -> None:
    """A model name in the URL (~8 KB) or the fallback's answer (a 1 MB model_version)
    becomes a span attribute; the SDK holds every span until export at any size."""
    with tracing.span("infer", attributes={"fogline.model": "m" * 8000}):
        tracing.annotate_response({MODEL_VERSION: "v" * 1_000_000, SERVED_BY: "cloud"})
    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes[SERVED_BY] == "cloud"
    assert 0 < len(attributes["fogline.model"]) <= 256  # tracing.MAX_ATTRIBUTE_CHARS
    assert 0 < len(attributes[MODEL_VERSION]) <= 256  # tracing.MAX_ATTRIBUTE_CHARS
