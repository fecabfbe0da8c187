"""FP32 vs INT8 edge model, side by side in one run: accuracy, size, latency.

``python -m bench.compression [--json] [--rounds N]``

Latency is measured in interleaved rounds (fp32, int8, fp32, int8, …) with
one intra-op thread each, so drift in machine speed (thermal, neighbours)
hits both models alike; the figures that matter are the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud.pipeline.compress import evaluate, quantize_int8
from cloud.pipeline.data import load_digits_split
from cloud.pipeline.export import export_onnx
from cloud.pipeline.train import train_model
from common.onnx_runtime import open_session

logger = logging.getLogger(__name__)

MODELS = ("fp32", "int8")
BATCHES = (1, 64)
CALLS_PER_ROUND = {1: 200, 64: 40}  # per model, per round


def _time_calls(session: Any, name: str, rows: np.ndarray, calls: int) -> list[float]:
    """Wall time of each of ``calls`` session.run calls, in microseconds."""
    feeds = {name: rows}
    out: list[float] = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        session.run(None, feeds)
        out.append((time.perf_counter_ns() - start) / 1000.0)
    return out


def measure_latency(
    paths: dict[str, Path], x: np.ndarray, rounds: int
) -> dict[int, dict[str, float]]:
    """Median µs per request for each batch size and model, A,B,A,B interleaved."""
    sessions = {m: open_session(paths[m], threads=1) for m in MODELS}
    names = {m: sessions[m].get_inputs()[0].name for m in MODELS}
    inputs = {b: np.ascontiguousarray(x[:b], dtype=np.float32) for b in BATCHES}
    samples: dict[int, dict[str, list[float]]] = {b: {m: [] for m in MODELS} for b in BATCHES}
    for m in MODELS:  # warm-up: first runs allocate and pick kernels
        for b in BATCHES:
            _time_calls(sessions[m], names[m], inputs[b], 20)
    for _ in range(rounds):
        for b in BATCHES:
            for m in MODELS:
                samples[b][m] += _time_calls(sessions[m], names[m], inputs[b], CALLS_PER_ROUND[b])
    return {b: {m: statistics.median(samples[b][m]) for m in MODELS} for b in BATCHES}


def run(rounds: int, workdir: Path) -> dict[str, Any]:
    """Train, export, quantize, then measure both models; returns the JSON figures."""
    split = load_digits_split()
    started = time.perf_counter()
    model = train_model("edge", split)
    train_s = time.perf_counter() - started
    paths = {"fp32": workdir / "edge.fp32.onnx", "int8": workdir / "edge.int8.onnx"}
    export_onnx(model, paths["fp32"])
    quantize_int8(paths["fp32"], paths["int8"], split.x_train)
    acc = {m: evaluate(paths[m], split.x_test, split.y_test) for m in MODELS}
    size = {m: paths[m].stat().st_size for m in MODELS}
    latency = measure_latency(paths, split.x_test, rounds)
    return {
        "fp32_accuracy": acc["fp32"],
        "int8_accuracy": acc["int8"],
        "accuracy_drop_points": (acc["fp32"] - acc["int8"]) * 100.0,
        "fp32_bytes": size["fp32"],
        "int8_bytes": size["int8"],
        "size_ratio": size["fp32"] / size["int8"],
        "latency_us_b1": latency[1],
        "latency_us_b64": latency[64],
        "speedup_b1": latency[1]["fp32"] / latency[1]["int8"],
        "speedup_b64": latency[64]["fp32"] / latency[64]["int8"],
        "rounds": rounds,
        "train_s": train_s,
    }


def format_table(r: dict[str, Any]) -> str:
    """The figures as a small table: fp32, int8 and their ratio."""
    b1, b64 = r["latency_us_b1"], r["latency_us_b64"]
    rows = [
        ("", "fp32", "int8", "fp32/int8"),
        ("test accuracy", f"{r['fp32_accuracy']:.2%}", f"{r['int8_accuracy']:.2%}", ""),
        ("file bytes", str(r["fp32_bytes"]), str(r["int8_bytes"]), f"{r['size_ratio']:.2f}x"),
        ("µs/req batch 1", f"{b1['fp32']:.1f}", f"{b1['int8']:.1f}", f"{r['speedup_b1']:.2f}x"),
        ("µs/req batch 64", f"{b64['fp32']:.1f}", f"{b64['int8']:.1f}", f"{r['speedup_b64']:.2f}x"),
    ]
    lines = [f"{a:<16} {b:>10} {c:>10} {d:>10}" for a, b, c, d in rows]
    lines.append(
        f"edge MLP, accuracy drop {r['accuracy_drop_points']:+.2f} points; latency = median of "
        f"{r['rounds']} interleaved rounds, ONNX Runtime CPU, 1 intra-op thread"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compression",
        description="Compare the fp32 and int8 edge model side by side in one run.",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="fogline-bench-") as tmp:
        result = run(args.rounds, Path(tmp))
    print(format_table(result))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
