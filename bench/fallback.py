"""The cloud fallback under concurrent load vs MLServer 1.7.1 and vs ONNX Runtime in process.

``python -m bench.fallback [--json] [--quick] [--no-mlserver] [--models digits,...]``

Batch-1 V2 JSON requests from 1, 8, 32 and 64 concurrent clients (``bench.loadgen``,
its own process) go, interleaved in each round, to a ``fogline fallback serve``
process (dynamic batching on, the defaults) and to MLServer serving the same
ONNX files with adaptive batching (max 32, 5 ms). The ceiling is ONNX Runtime in
this process at the batch sizes the batcher formed (read from the fallback's
``/metrics``) and at its best size. Every figure of one model comes from the
same run, so drift of the shared host hits all sides alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.fallback_models import MAX_BATCH, BenchModel, digits, minilm
from bench.fallback_workers import compare_workers
from bench.mlserver_peer import MLServer, PeerUnavailable, write_repository
from common.batch_calibration import tile
from common.onnx_runtime import open_session
from common.serving_metrics import parse
from common.signing import Signer
from fogline.broker import free_port
from fogline.processes import ManagedProcess

logger = logging.getLogger(__name__)

CONCURRENCY = (1, 8, 32, 64)
CEILING_SIZES = (1, 2, 4, 8, 16, 32)


def timing(model: BenchModel, args: argparse.Namespace) -> tuple[float, float]:
    """(measured, warm-up) seconds of one run: MiniLM's batches take seconds on a busy host,
    so its windows are longer (a window must hold many batch cycles)."""
    if model.key.startswith("minilm"):
        return max(args.seconds, 4 * args.seconds if args.quick else 20.0), 3 * args.warmup
    return args.seconds, args.warmup


def loadgen(url: str, body: Path, concurrency: int, seconds: float, warmup: float) -> dict:
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", url, "--body", str(body)]
    cmd += ["--concurrency", str(concurrency), "--seconds", str(seconds), "--warmup", str(warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 120)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed: {done.stderr.strip()[-500:]}")
    return dict(json.loads(done.stdout))


def executions(base: str, model: str) -> tuple[float, float]:
    """(inferences, executions) so far, from the fallback's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        m = parse(resp.read().decode())

    def total(name: str) -> float:
        return sum(v for labels, v in m.get(name, []) if labels.get("model") == model)

    return total("nv_inference_count_total"), total("nv_inference_exec_count_total")


CEILING_PASSES = 3


def ceiling(model: BenchModel, sizes: tuple[int, ...], seconds: float) -> dict[int, float]:
    """In-process rows/s at each batch size (the server's thread settings: one per core).

    The sizes are timed in ``CEILING_PASSES`` interleaved passes and each size's median
    is kept: the best size is a maximum over sizes, and a maximum of single noisy
    timings is biased upwards (one run saw b2 below b1 and b8 25% above b4)."""
    session = open_session(model.model_file, threads=0)
    timed: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(CEILING_PASSES):
        for size in sizes:
            feeds = tile(model.example, size)
            session.run(None, feeds)
            runs, start = 0, time.perf_counter()
            while runs < 2 or time.perf_counter() - start < seconds:
                session.run(None, feeds)
                runs += 1
            timed[size].append(runs * size / (time.perf_counter() - start))
    return {size: statistics.median(rates) for size, rates in timed.items()}


def bench_model(
    model: BenchModel,
    fogline_url: str,
    peer_url: str | None,
    args: argparse.Namespace,
    workdir: Path,
) -> dict[str, Any]:
    body = workdir / f"{model.key}.json"
    body.write_bytes(model.body)
    path = f"/v2/models/{model.name}/infer"
    runs: dict[str, dict[int, list[dict]]] = {"fogline": {}, "mlserver": {}}
    formed: dict[int, list[float]] = {}
    ceilings: list[dict[int, float]] = []
    for rnd in range(args.rounds):
        for c in args.concurrency:
            targets = [("fogline", fogline_url)] + ([("mlserver", peer_url)] if peer_url else [])
            if rnd % 2:
                targets.reverse()  # interleaved, in alternating order
            for target, base in targets:
                before = executions(fogline_url, model.name) if target == "fogline" else None
                r = loadgen(base + path, body, c, *timing(model, args))
                runs[target].setdefault(c, []).append(r)
                if before is not None:
                    after = executions(fogline_url, model.name)
                    n, e = after[0] - before[0], after[1] - before[1]
                    formed.setdefault(c, []).append(n / e if e else 0.0)
        sizes = tuple(s for s in CEILING_SIZES if s <= args.max_batch)
        ceilings.append(ceiling(model, sizes, args.ceiling_seconds))
    return summarise(runs, formed, ceilings)


def summarise(
    runs: dict[str, dict[int, list[dict]]],
    formed: dict[int, list[float]],
    ceilings: list[dict[int, float]],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target, by_c in runs.items():
        if not by_c:
            continue
        out[target] = {
            str(c): {
                "requests_per_s": round(statistics.median(r["requests_per_s"] for r in rs), 1),
                "p50_ms": statistics.median(r["p50_ms"] or 0.0 for r in rs),
                "p99_ms": statistics.median(r["p99_ms"] or 0.0 for r in rs),
                "errors": sum(sum(r["errors"].values()) for r in rs),
                "runs_requests_per_s": [r["requests_per_s"] for r in rs],
            }
            for c, rs in by_c.items()
        }
    out["mean_batch_formed"] = {str(c): round(statistics.median(v), 2) for c, v in formed.items()}
    per_size = {s: statistics.median(c[s] for c in ceilings) for s in ceilings[0]}
    out["ceiling_rows_per_s"] = {str(s): round(v, 1) for s, v in per_size.items()}
    out["ceiling_best_rows_per_s"] = round(max(per_size.values()), 1)
    for c in formed:
        mean = statistics.median(formed[c])
        nearest = min(per_size, key=lambda s: abs(np.log2(s) - np.log2(max(mean, 1.0))))
        out.setdefault("ceiling_at_formed_batch", {})[str(c)] = {
            "batch": nearest,
            "rows_per_s": round(per_size[nearest], 1),
        }
    fog = out.get("fogline", {})
    peer = out.get("mlserver", {})
    out["vs_mlserver"] = {
        c: round(fog[c]["requests_per_s"] / peer[c]["requests_per_s"], 2)
        for c in fog
        if c in peer and peer[c]["requests_per_s"]
    }
    out["vs_ceiling"] = {
        c: round(fog[c]["requests_per_s"] / out["ceiling_best_rows_per_s"], 2) for c in fog
    }
    return out


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    signer = Signer.generate()
    models: list[BenchModel] = []
    if "digits" in args.models:
        models.append(digits(workdir, signer))
    if {"minilm_int8", "minilm_fp32"} & set(args.models):
        int8, fp32 = minilm(workdir, signer)
        models += [m for m in (int8, fp32) if m.key in args.models]
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "concurrency": list(args.concurrency),
        "rounds": args.rounds,
        "seconds_per_run": args.seconds,
        "models": {},
    }
    port = free_port()
    cmd = ["fallback", "serve", "--port", str(port)]
    for m in models:
        cmd += ["--package", str(m.package), "--trust-key", signer.public_key_hex]
    fogline = ManagedProcess("fallback", cmd, workdir / "fallback.log")
    peer: MLServer | None = None
    try:
        fogline.wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", 600)
        fogline_url = f"http://127.0.0.1:{port}"
        result["batching"] = _batching_metadata(fogline_url, models)
        if args.mlserver:
            try:
                root = write_repository(
                    workdir / "mlserver", {m.name: m.model_file for m in models}
                )
                peer = MLServer(root, free_port(), free_port(), free_port())
                peer.start([m.name for m in models])
            except (PeerUnavailable, OSError, subprocess.SubprocessError) as exc:
                result["mlserver_unavailable"] = str(exc)
                peer = None
        else:
            result["mlserver_unavailable"] = "not run (--no-mlserver)"
        for m in models:
            logger.warning("benchmarking %s", m.key)
            result["models"][m.key] = bench_model(
                m, fogline_url, peer.url if peer else None, args, workdir
            )
    finally:
        fogline.stop()
        if peer is not None:
            peer.stop()
    if args.workers_check:
        result["reuse_port_workers"] = compare_workers(
            models, signer, args, workdir, loadgen, timing
        )
    result.update(headline(result["models"]))
    return result


def _batching_metadata(base: str, models: list[BenchModel]) -> dict[str, Any]:
    import urllib.request

    out = {}
    for m in models:
        with urllib.request.urlopen(f"{base}/v2/models/{m.name}", timeout=10) as resp:
            params = json.loads(resp.read())["parameters"]
        out[m.key] = {k.split(".")[-1]: v for k, v in params.items() if "batching" in k}
    return out


def headline(models: dict[str, Any]) -> dict[str, Any]:
    def pick(key: str, field: str) -> float | None:
        value = models.get(key, {}).get(field, {}).get("32")
        return None if value is None else float(value)

    return {
        "minilm_vs_mlserver_c32": pick("minilm_int8", "vs_mlserver"),
        "minilm_vs_ceiling_c32": pick("minilm_int8", "vs_ceiling"),
        "digits_vs_mlserver_c32": pick("digits", "vs_mlserver"),
    }


def format_table(r: dict[str, Any]) -> str:
    lines = [f"bench.fallback {r['date']}: req/s (p50/p99 ms), batch-1 requests"]
    for key, m in r["models"].items():
        lines.append(f"{key}: ceiling in process {m['ceiling_best_rows_per_s']} rows/s (best size)")
        for c in r["concurrency"]:
            row = f"  c={c:<3}"
            for target in ("fogline", "mlserver"):
                x = m.get(target, {}).get(str(c))
                if x:
                    row += f"  {target} {x['requests_per_s']:>7} ({x['p50_ms']}/{x['p99_ms']})"
            row += f"  batch~{m['mean_batch_formed'].get(str(c))}"
            if str(c) in m["vs_mlserver"]:
                row += f"  x{m['vs_mlserver'][str(c)]} vs MLServer"
            lines.append(row)
    if "mlserver_unavailable" in r:
        lines.append(f"MLServer: {r['mlserver_unavailable']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fallback", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.add_argument("--quick", action="store_true", help="digits only, 1 round of short runs")
    p.add_argument("--no-mlserver", dest="mlserver", action="store_false", help="skip MLServer")
    p.add_argument("--models", help="comma list of digits,minilm_int8,minilm_fp32 (default all)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 2; quick 1)")
    p.add_argument("--seconds", type=float, help="measured seconds per run (default 5; quick 1)")
    p.add_argument("--no-workers-check", dest="workers_check", action="store_false",
                   help="skip the SO_REUSEPORT two-process comparison")  # fmt: skip
    args = p.parse_args(argv)
    all_models = ("digits", "minilm_int8", "minilm_fp32")
    models = (args.models or ("digits" if args.quick else ",".join(all_models))).split(",")
    if not set(models) <= set(all_models) or not models:
        print(f"bench.fallback: error: --models takes {','.join(all_models)}", file=sys.stderr)
        return 1
    args.models = models
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.seconds = args.seconds or (1.0 if args.quick else 5.0)
    args.warmup = 0.3 if args.quick else 1.0
    args.ceiling_seconds = 0.2 if args.quick else 1.0
    args.concurrency = (1, 32) if args.quick else CONCURRENCY
    args.max_batch = MAX_BATCH
    args.workers_check = args.workers_check and not args.quick
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="fogline-bench-fallback-") as tmp:
        result = run(args, Path(tmp))
    print(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
