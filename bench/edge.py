"""The edge agent's local V2 API vs the raw runtime, side by side in one run.

``python -m bench.edge [--json] [--rounds N] [--calls N]``

A real ``fogline edge run`` process serves the int8 digits model (provisioned
straight into its A/B store, so no broker or control plane is needed); the
same inputs go, in interleaved rounds, to ONNX Runtime's ``session.run`` in
this process and to the agent over HTTP (JSON, ``fogline.route: local``, one
request at a time). The ratio is what the agent's HTTP, codec and router add.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from cloud.pipeline.compress import quantize_int8
from cloud.pipeline.data import load_digits_split
from cloud.pipeline.export import export_onnx
from cloud.pipeline.package import build_package, calibrate_routing
from cloud.pipeline.train import train_model
from common.inference import ROUTE, InferRequest, Tensor, request_to_rest
from common.manifest import SignedManifest, artifact_bytes, split_artifact
from common.onnx_runtime import open_session
from common.signing import Signer, TrustStore
from edge.model_store import ModelStore
from fogline.processes import ManagedProcess

logger = logging.getLogger(__name__)

# The floor any Python HTTP server pays: aiohttp parsing the same JSON body and
# answering a fixed V2-shaped JSON, in its own process like the agent.
ECHO_SERVER = """
import json, sys
from aiohttp import web
ANSWER = json.dumps({"model_name": "digits", "outputs": [{"name": "probabilities",
    "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10}]})
async def infer(request):
    json.loads(await request.read())
    return web.Response(text=ANSWER, content_type="application/json")
async def live(request):
    return web.Response(text="{}", content_type="application/json")
app = web.Application()
app.router.add_post("/v2/models/digits/infer", infer)
app.router.add_get("/v2/health/ready", live)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def provision(workdir: Path) -> tuple[Path, Path, str, np.ndarray]:
    """Train, quantize, package, sign and stage the edge model into an agent's store."""
    split = load_digits_split(0)
    fp32 = export_onnx(train_model("edge", split), workdir / "fp32.onnx")
    int8 = quantize_int8(fp32, workdir / "int8.onnx", split.x_train)
    manifest = build_package(
        int8,
        workdir / "pkg",
        name="digits",
        version="1",
        release=1,
        variant="edge",
        precision="int8",
        golden_rows=split.x_test[:8],
        evaluation={},
        routing=calibrate_routing(int8, split.x_val),
    )
    signer = Signer.generate()
    signed = SignedManifest.sign(manifest, signer)
    files = split_artifact(artifact_bytes(workdir / "pkg", manifest), manifest)
    state = workdir / "agent"
    store = ModelStore(state, TrustStore([signer.public_key_hex]))
    store.activate(store.stage(signed, files))
    return int8, state, signer.public_key_hex, split.x_test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raw(session: Any, rows: list[np.ndarray]) -> list[float]:
    out = []
    for row in rows:
        start = time.perf_counter_ns()
        session.run(None, {"input": row})
        out.append((time.perf_counter_ns() - start) / 1000.0)
    return out


async def _server(http: aiohttp.ClientSession, url: str, rows: list[np.ndarray]) -> list[float]:
    out = []
    for row in rows:
        request = InferRequest("digits", [Tensor("input", row)], parameters={ROUTE: "local"})
        body = request_to_rest(request)
        start = time.perf_counter_ns()
        async with http.post(url, json=body) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"agent answered {resp.status}")
        out.append((time.perf_counter_ns() - start) / 1000.0)
    return out


async def measure(
    model: Path, apis: dict[str, str], x: np.ndarray, rounds: int, calls: int
) -> dict[str, float]:
    session = open_session(model, threads=1)
    rows = [np.ascontiguousarray(x[i : i + 1], dtype=np.float32) for i in range(calls)]
    samples: dict[str, list[float]] = {"raw": [], **{k: [] for k in apis}}
    urls = {k: f"{base}/v2/models/digits/infer" for k, base in apis.items()}
    async with aiohttp.ClientSession() as http:
        _raw(session, rows[:20])  # warm-up every path
        for url in urls.values():
            await _server(http, url, rows[:20])
        for _ in range(rounds):  # interleaved: drift hits every path alike
            samples["raw"] += _raw(session, rows)
            for name, url in urls.items():
                samples[name] += await _server(http, url, rows)
    return {k: statistics.median(v) for k, v in samples.items()}


def run(rounds: int, calls: int, workdir: Path) -> dict[str, Any]:
    model, state, key, x = provision(workdir)
    port, echo_port = _free_port(), _free_port()
    config = workdir / "agent.json"
    config.write_text(
        json.dumps(
            {
                "device_id": "bench",
                "state_dir": str(state),
                "trusted_keys": [key],
                "model": "digits",
                "api_port": port,
                "broker_port": _free_port(),
            }
        )
    )
    agent = ManagedProcess("agent", ["edge", "run", "--config", str(config)], workdir / "agent.log")
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(echo_port)])
    try:
        apis = {"server": f"http://127.0.0.1:{port}", "floor": f"http://127.0.0.1:{echo_port}"}
        agent.wait_ready(f"{apis['server']}/v2/health/ready", 60)
        agent.wait_ready(f"{apis['floor']}/v2/health/ready", 60)
        med = asyncio.run(measure(model, apis, x, rounds, calls))
    finally:
        agent.stop()
        echo.terminate()
        echo.wait(10)
    return {
        "raw_us_b1": round(med["raw"], 1),
        "server_us_b1": round(med["server"], 1),
        "http_floor_us_b1": round(med["floor"], 1),
        "server_overhead_ratio": round(med["server"] / med["raw"], 2),
        "server_vs_http_floor_ratio": round(med["server"] / med["floor"], 2),
        "rounds": rounds,
        "calls_per_round": calls,
    }


def format_table(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"{'path (batch 1, int8 digits MLP)':<44}{'µs/request':>12}",
            f"{'ONNX Runtime session.run, in process':<44}{r['raw_us_b1']:>12.1f}",
            f"{'bare aiohttp JSON echo over HTTP (floor)':<44}{r['http_floor_us_b1']:>12.1f}",
            f"{'agent V2 API over HTTP (JSON, local)':<44}{r['server_us_b1']:>12.1f}",
            f"agent / raw runtime = {r['server_overhead_ratio']:.1f}x; "
            f"agent / HTTP floor = {r['server_vs_http_floor_ratio']:.2f}x; medians of "
            f"{r['rounds']} interleaved rounds x {r['calls_per_round']} requests",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.edge", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=200, help="requests per path per round")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="fogline-bench-edge-") as tmp:
        result = run(args.rounds, args.calls, Path(tmp))
    print(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
