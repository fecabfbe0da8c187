"""The edge agent against the raw runtime, side by side in one run.

``python -m bench.edge [--json] [--quick] [--rounds N] [--calls N] [--clients N]``

Real ``fogline edge run`` processes serve the int8 digits model and the int8
MiniLM (provisioned straight into their A/B stores, so no broker or control
plane is needed); the same inputs go, in interleaved rounds, to ONNX Runtime's
``session.run`` in this process and to the agents over HTTP (JSON,
``fogline.route: local``): latency over one connection, throughput over
several. Then the digits cascade at its shipped threshold (``edge_cascade``)
and failed requests during a rollout and rollback under load (``edge_swap``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.edge_cascade import cascade_figures
from bench.edge_load import interleaved_p50_us, interleaved_throughput, rest_bodies
from bench.edge_minilm import build_edge_package, token_feeds
from bench.edge_swap import hot_swap
from cloud.pipeline.compress import quantize_int8
from cloud.pipeline.data import Split, load_digits_split
from cloud.pipeline.edge_student import shipped_routing, train_student
from cloud.pipeline.export import export_onnx
from cloud.pipeline.minilm import EDGE_MAX_TOKENS
from cloud.pipeline.package import build_package
from cloud.pipeline.train import train_model
from common.manifest import Manifest, RoutingHints, SignedManifest, artifact_bytes, split_artifact
from common.onnx_runtime import open_session
from common.signing import Signer, TrustStore
from edge.model_store import ModelStore
from fogline.broker import free_port
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


def stage(pkg: Path, manifest: Manifest, signer: Signer, state: Path) -> None:
    """Sign a package and activate it in an agent's A/B store, as a deploy would."""
    signed = SignedManifest.sign(manifest, signer)
    files = split_artifact(artifact_bytes(pkg, manifest), manifest)
    store = ModelStore(state, TrustStore([signer.public_key_hex]))
    store.activate(store.stage(signed, files))


def provision(workdir: Path) -> Digits:
    """Train, quantize and package the shipped edge model (``fogline demo``'s: distilled
    from the cloud CNN, with its calibrated threshold) as versions 1 and 2 (the hot swap's)."""
    split = load_digits_split(0)
    cloud = export_onnx(train_model("cloud", split), workdir / "cloud-fp32.onnx")
    fp32 = export_onnx(train_student(split, cloud), workdir / "fp32.onnx")
    int8 = quantize_int8(fp32, workdir / "int8.onnx", split.x_train)
    hints = shipped_routing(int8, split)
    packages = {
        version: (
            workdir / f"pkg-{version}",
            build_package(
                int8,
                workdir / f"pkg-{version}",
                name="digits",
                version=version,
                release=int(version),
                variant="edge",
                precision="int8",
                golden_rows=split.x_test[:8],
                evaluation={},
                routing=hints,
            ),
        )
        for version in ("1", "2")
    }
    return Digits(int8, split, hints, packages, cloud)


@dataclass
class Digits:
    model: Path
    split: Split
    hints: RoutingHints
    packages: dict[str, tuple[Path, Manifest]]
    cloud: Path


class Agent:
    """A ``fogline edge run`` process serving what was staged into ``state``."""

    def __init__(self, workdir: Path, model: str, state: Path, key: str) -> None:
        self.port = free_port()
        config = workdir / f"agent-{model}.json"
        config.write_text(
            json.dumps(
                {
                    "device_id": f"bench-{model}",
                    "state_dir": str(state),
                    "trusted_keys": [key],
                    "model": model,
                    "api_port": self.port,
                    "broker_port": free_port(),
                }
            )
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.infer_url = f"{self.url}/v2/models/{model}/infer"
        self.proc = ManagedProcess(
            f"agent-{model}", ["edge", "run", "--config", str(config)], workdir / f"{model}.log"
        )

    def wait_ready(self) -> None:
        self.proc.wait_ready(f"{self.url}/v2/health/ready", 120)


def _rows(x: np.ndarray, n: int) -> list[dict[str, np.ndarray]]:
    return [{"input": np.ascontiguousarray(x[i : i + 1], dtype=np.float32)} for i in range(n)]


def run(p: Params, workdir: Path) -> dict[str, Any]:
    digits = provision(workdir)
    text_model, text_pkg, text_manifest = build_edge_package(workdir / "minilm")
    signer = Signer.generate()
    stage(*digits.packages["1"], signer, workdir / "state-digits")
    stage(text_pkg, text_manifest, signer, workdir / "state-minilm")
    key = signer.public_key_hex
    echo_port = free_port()
    agents = {
        "digits": Agent(workdir, "digits", workdir / "state-digits", key),
        "minilm": Agent(workdir, "minilm", workdir / "state-minilm", key),
    }
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(echo_port)])
    floor = f"http://127.0.0.1:{echo_port}"
    rows = _rows(digits.split.x_test, p.calls)
    tokens = token_feeds(p.text_calls)
    try:
        for agent in agents.values():
            agent.wait_ready()
        agents["digits"].proc.wait_ready(f"{floor}/v2/health/ready", 60)
        med = asyncio.run(
            interleaved_p50_us(
                open_session(digits.model, threads=1),
                {"server": agents["digits"].infer_url, "floor": f"{floor}/v2/models/digits/infer"},
                "digits",
                rows,
                p.rounds,
            )
        )
        text_session = open_session(text_model, threads=1)
        text = asyncio.run(
            interleaved_p50_us(
                text_session, {"server": agents["minilm"].infer_url}, "minilm", tokens, p.rounds
            )
        )
        tput_digits = asyncio.run(
            interleaved_throughput(
                open_session(digits.model, threads=1),
                agents["digits"].infer_url,
                "digits",
                rows,
                p.clients,
                p.calls * 2,
                p.rounds,
            )
        )
        tput_text = asyncio.run(
            interleaved_throughput(
                text_session,
                agents["minilm"].infer_url,
                "minilm",
                tokens,
                p.clients,
                p.text_calls * 2,
                p.rounds,
            )
        )
    finally:
        for agent in agents.values():
            agent.proc.stop()
        echo.terminate()
        echo.wait(10)
    cascade = cascade_figures(digits.model, digits.cloud, digits.hints, digits.split)
    swap = hot_swap(
        workdir / "swap",
        digits.packages,
        rest_bodies("digits", rows[:1])[0],
        clients=p.clients,
        settle_s=p.settle_s,
    )
    return {
        "raw_us_b1": round(med["raw"], 1),
        "server_us_b1": round(med["server"], 1),
        "http_floor_us_b1": round(med["floor"], 1),
        "server_overhead_ratio": round(med["server"] / med["raw"], 2),
        "server_vs_http_floor_ratio": round(med["server"] / med["floor"], 2),
        "minilm_raw_ms_p50": round(text["raw"] / 1000.0, 3),
        "minilm_server_ms_p50": round(text["server"] / 1000.0, 3),
        "overhead_p50_ms_minilm": round((text["server"] - text["raw"]) / 1000.0, 3),
        "throughput_ratio_minilm": round(tput_text["ratio"], 3),
        "throughput_ratio_minilm_range": [
            round(tput_text["ratio_min"], 3),
            round(tput_text["ratio_max"], 3),
        ],
        "throughput_rps_minilm": {k: round(tput_text[k], 1) for k in ("local_rps", "agent_rps")},
        "throughput_ratio_digits": round(tput_digits["ratio"], 3),
        "throughput_ratio_digits_range": [
            round(tput_digits["ratio_min"], 3),
            round(tput_digits["ratio_max"], 3),
        ],
        "throughput_rps_digits": {k: round(tput_digits[k], 1) for k in ("local_rps", "agent_rps")},
        **cascade,
        **swap,
        "clients": p.clients,
        "rounds": p.rounds,
        "calls_per_round": p.calls,
        "minilm_calls_per_round": p.text_calls,
        "minilm_tokens": EDGE_MAX_TOKENS,
    }


@dataclass
class Params:
    rounds: int = 10
    calls: int = 200
    text_calls: int = 40
    clients: int = 4
    settle_s: float = 2.0


QUICK = Params(rounds=2, calls=30, text_calls=8, clients=3, settle_s=0.5)


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
            f"MiniLM int8, {r['minilm_tokens']} tokens, batch 1: in process "
            f"{r['minilm_raw_ms_p50']:.2f} ms, agent {r['minilm_server_ms_p50']:.2f} ms p50 "
            f"(overhead {r['overhead_p50_ms_minilm']:.2f} ms; target <= 0.5)",
            f"throughput, {r['clients']} connections, agent / in process: MiniLM "
            f"{r['throughput_ratio_minilm']:.2f} (target >= 0.9), digits "
            f"{r['throughput_ratio_digits']:.2f} (target >= 0.5)",
            f"cascade at the shipped threshold: {100 * r['cascade_escalated_fraction']:.1f}% "
            f"escalated, {r['cascade_gap_pt']:.2f} pt under cloud-only "
            f"({'meets' if r['cascade_target_met'] else 'MISSES'} <= 12% within 0.3 pt); "
            f"calibrated for 0.1 pt on val: "
            f"{100 * r['cascade_gap_calibrated_escalated_fraction']:.1f}%"
            f" escalated, {r['cascade_gap_calibrated_gap_pt']:.2f} pt",
            f"hot swap (roll out v2, roll back to v1, {r['hot_swap_clients']} clients): "
            f"{r['hot_swap_failed_requests']} failed of {r['hot_swap_requests']} requests",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.edge",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument("--rounds", type=int, default=Params.rounds)
    parser.add_argument("--calls", type=int, default=Params.calls, help="digits requests/round")
    parser.add_argument(
        "--clients", type=int, default=Params.clients, help="concurrent connections"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    params = QUICK if args.quick else Params(args.rounds, args.calls, clients=args.clients)
    with tempfile.TemporaryDirectory(prefix="fogline-bench-edge-") as tmp:
        result = run(params, Path(tmp))
    print(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
