"""Compression methods side by side, one table per model: size, quality, speed.

``python -m bench.compression [--json] [--quick] [--rounds N] [--min-cosine C]``

For the digits CNN (trained here) and MiniLM (exported here): fp32 ONNX,
PyTorch eager, int8 static QDQ (the ``compress`` default), int8 dynamic
(MiniLM), the int8 configuration the accuracy-driven search keeps, and fp16.
Each row gives size, quality (test accuracy; mean cosine to the fp32 PyTorch
embeddings), ORT latency p50 at batch 1 and throughput at batch 32 (digits:
256), as ratios to the fp32 ONNX model and to PyTorch eager. All runners of a
model are timed in the same interleaved rounds on one thread each
(``cloud.pipeline.speed_compare``): this machine drifts, only paired ratios mean anything.

MiniLM's "fp32 onnx" is the shipped cloud variant, fused by ONNX Runtime's
transformer optimizer; its int8 rows are made from that graph and compared to
it. The plain export is a row of its own ("fp32 onnx plain", with "int8
dynamic plain": yesterday's edge variant) and every row has its ratio to it too
(``*_vs_plain``). ``--quick`` skips the MiniLM search and times the shipped
edge config (``minilm.EDGE_CONFIG``, which the search picked) instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.compression_models import BenchModel, digits_cnn, minilm
from cloud.pipeline.compress_cli import print_search_table
from cloud.pipeline.compressor import make_scorer
from cloud.pipeline.fp16 import convert_fp16
from cloud.pipeline.quant_search import search
from cloud.pipeline.quantize import DYNAMIC, QuantConfig, quantize
from cloud.pipeline.speed_compare import measure, session_runner

logger = logging.getLogger(__name__)

FP32, EAGER, SEARCHED = "fp32 onnx", "pytorch eager", "int8 (search)"
PLAIN, PLAIN_DYNAMIC, SHIPPED = "fp32 onnx plain", "int8 dynamic plain", "int8 edge (shipped)"
BASES = {FP32: "vs_fp32", EAGER: "vs_eager", PLAIN: "vs_plain"}


def _variants(m: BenchModel, work: Path, quick: bool, rounds: int) -> tuple[dict, Any]:
    """{row name: (path, config label)} of the compressed models, and the search result."""
    out: dict[str, tuple[Path, str]] = {}
    static = QuantConfig()
    out["int8 static qdq"] = (
        quantize(m.fp32, work / "static.onnx", static, m.calibration),
        static.label(),
    )
    if m.name == "minilm":  # dynamic Conv is ~12x slower than fp32: not worth a digits row
        from cloud.pipeline.minilm import EDGE_CONFIG

        dynamic = QuantConfig(DYNAMIC, op_types=("MatMul", "Gather"))
        if m.plain_fp32 is not None:  # the edge variant before fusion, for the record
            out[PLAIN_DYNAMIC] = (
                quantize(m.plain_fp32, work / "dynamic-plain.onnx", dynamic),
                dynamic.label() + " (plain export)",
            )
        out[SHIPPED] = (quantize(m.fp32, work / "edge.onnx", EDGE_CONFIG), EDGE_CONFIG.label())
    found = None
    if not (quick and m.name == "minilm"):  # the MiniLM search takes minutes
        metric, parent_quality, score = make_scorer(m.fp32, m.data)
        found = search(
            m.fp32, m.calibration, m.data, work, score, m.gate, metric=metric,
            parent_quality=parent_quality, speed_batch=m.batch, rounds=rounds,
            speed_feeds=m.speed_feeds,
        )  # fmt: skip
        print(f"{m.name}: int8 search", file=sys.stderr)
        print_search_table(found, sys.stderr)  # stdout keeps the result tables and --json
        if found.best is not None:
            out[SEARCHED] = (found.best.path, found.best.config.label())
    out["fp16"] = (convert_fp16(m.fp32, work / "fp16.onnx"), "fp32 I/O kept")
    return out, found


def run_model(m: BenchModel, work: Path, quick: bool, rounds: int) -> dict[str, Any]:
    """Every method of one model, measured side by side."""
    variants, found = _variants(m, work, quick, rounds)
    metric, fp32_quality, score = make_scorer(m.fp32, m.data)
    runners = {FP32: session_runner(m.fp32), EAGER: m.torch_runner}
    if m.plain_fp32 is not None:
        runners[PLAIN] = session_runner(m.plain_fp32)
    timed = [v for v in variants if not (quick and v == "fp16")]  # fp16 is a GPU format
    runners.update({v: session_runner(variants[v][0]) for v in timed})
    speeds = measure(runners, m.speed_feeds, batch=m.batch, rounds=rounds)
    size = m.fp32.stat().st_size
    rows: dict[str, dict[str, Any]] = {
        FP32: {"config": "", "size_bytes": size, "quality": fp32_quality},
        EAGER: {"config": "", "size_bytes": None, "quality": m.torch_quality},
    }
    models = dict(variants)
    if m.plain_fp32 is not None:
        models[PLAIN] = (m.plain_fp32, "before fusion")
    for name, (path, label) in models.items():
        rows[name] = {"config": label, "size_bytes": path.stat().st_size, "quality": score(path)}
    for name, row in rows.items():
        s = speeds.get(name)
        row["latency_p50_ms_b1"] = s.latency_p50_ms_b1 if s else None
        row[f"throughput_b{m.batch}"] = s.throughput if s else None
        for base, key in BASES.items():
            if s and base in speeds:
                row[f"latency_b1_{key}"] = speeds[base].latency_p50_ms_b1 / s.latency_p50_ms_b1
                row[f"throughput_{key}"] = s.throughput / speeds[base].throughput
        row["size_ratio"] = row["size_bytes"] / size if row["size_bytes"] else None
    tried = len(found.trials) if found else 0
    return {"metric": metric, "batch": m.batch, "rows": rows, "search_tried": tried}


def _headline(name: str, table: dict[str, Any]) -> dict[str, Any]:
    rows = table["rows"]
    key = SEARCHED if SEARCHED in rows else (SHIPPED if name == "minilm" else "")
    key = key or "int8 static qdq"
    row = rows[key]
    if name == "minilm":
        return {
            "minilm_int8_method": key,
            "minilm_int8_config": row["config"],
            "minilm_int8_speedup": row["throughput_vs_fp32"],  # vs the fused (shipped) fp32
            "minilm_int8_speedup_vs_plain_fp32": row.get("throughput_vs_plain"),
            "minilm_int8_mean_cosine": row["quality"],
            "minilm_int8_size_ratio": row["size_ratio"],
            "minilm_fp32_fused_speedup_vs_plain": rows[FP32].get("throughput_vs_plain"),
            "minilm_int8_plain_speedup_vs_plain_fp32": rows[PLAIN_DYNAMIC].get(
                "throughput_vs_plain"
            ),
        }
    return {
        "digits_int8_method": key,
        "digits_int8_speedup": row["throughput_vs_fp32"],
        "digits_int8_accuracy_drop_pt": (rows[FP32]["quality"] - row["quality"]) * 100.0,
    }


def _distillation(quick: bool) -> dict[str, Any]:
    """The distillation keys from ``bench.compression_distill`` (the ``lineage`` work)."""
    keys = ("distilled_escalated_fraction", "plain_escalated_fraction")
    try:
        from bench import compression_distill  # type: ignore[attr-defined]
    except ImportError as exc:
        reason = f"bench.compression_distill is not in this tree ({exc})"
        return {**dict.fromkeys(keys), "distillation_note": reason}
    return dict(compression_distill.measure(quick))


def run(workdir: Path, *, quick: bool, rounds: int, min_cosine: float) -> dict[str, Any]:
    started = time.perf_counter()
    tables: dict[str, Any] = {}
    headline: dict[str, Any] = {}
    for name in ("digits-cnn", "minilm"):
        work = workdir / name
        work.mkdir()
        m = digits_cnn(work, quick) if name == "digits-cnn" else minilm(work, quick, min_cosine)
        tables[name] = run_model(m, work, quick, rounds)
        headline.update(_headline(name, tables[name]))
    headline.update(_distillation(quick))
    return {
        **headline,
        "tables": tables,
        "quick": quick,
        "rounds": rounds,
        "minilm_min_cosine": min_cosine,
        "seconds": time.perf_counter() - started,
    }


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_tables(result: dict[str, Any]) -> str:
    lines = []
    for name, t in result["tables"].items():
        b = t["batch"]
        lines.append(f"{name} ({t['metric']}; ORT CPU 1 thread; ratios: fp32 onnx / eager)")
        if PLAIN in t["rows"]:
            lines.append("  fp32 onnx = the fused graph (shipped cloud variant); x plain below")
        head = f"{'method':<16} {'size':>7} {'quality':>8} {'p50 b1 ms':>10} {'x fp32':>7} "
        lines.append(
            head + f"{'x eager':>7} {'rows/s b' + str(b):>12} {'x fp32':>7} {'x eager':>7}"
        )
        for method, r in t["rows"].items():
            lines.append(
                f"{method:<16} {_fmt(r['size_ratio'], '.0%'):>7} {r['quality']:>8.4f} "
                f"{_fmt(r['latency_p50_ms_b1'], '.2f'):>10} "
                f"{_fmt(r.get('latency_b1_vs_fp32'), '.2f'):>7} "
                f"{_fmt(r.get('latency_b1_vs_eager'), '.2f'):>7} "
                f"{_fmt(r[f'throughput_b{b}'], '.1f'):>12} "
                f"{_fmt(r.get('throughput_vs_fp32'), '.2f'):>7} "
                f"{_fmt(r.get('throughput_vs_eager'), '.2f'):>7}"
            )
        if PLAIN in t["rows"]:
            lines.append(f"  throughput x {PLAIN}: " + ", ".join(
                f"{k} {_fmt(r.get('throughput_vs_plain'), '.2f')}"
                for k, r in t["rows"].items() if r.get("throughput_vs_plain") is not None
            ))  # fmt: skip
        configs = [f"{k}: {r['config']}" for k, r in t["rows"].items() if r["config"]]
        lines += ["  " + "; ".join(configs), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compression",
        description="Compression methods side by side for the digits CNN and MiniLM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    parser.add_argument("--quick", action="store_true", help="short run: fewer rows and rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; quick 1)")
    parser.add_argument("--min-cosine", type=float, default=0.995, help="MiniLM search's gate")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="fogline-bench-") as tmp:
        result = run(Path(tmp), quick=args.quick, rounds=rounds, min_cosine=args.min_cosine)
    print(format_tables(result))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
