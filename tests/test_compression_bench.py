"""``python -m bench.compression --quick --json`` end to end: keys and sanity, not timings.

Slow (it trains the digits CNN and exports MiniLM): run with ``-m slow``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.fogline_cli import CLEAN_ENV, ROOT

HEADLINE = (
    "minilm_int8_speedup",
    "minilm_int8_mean_cosine",
    "minilm_int8_size_ratio",
    "digits_int8_speedup",
    "digits_int8_accuracy_drop_pt",
    "distilled_escalated_fraction",
    "plain_escalated_fraction",
)


@pytest.mark.slow
def test_quick_bench_reports_every_headline_key_with_sane_values() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.compression", "--quick", "--json"],
        capture_output=True, text=True, timeout=1800, cwd=ROOT, env=CLEAN_ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(HEADLINE) <= set(result)
    for key in HEADLINE[:5]:
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert 0.9 < result["minilm_int8_mean_cosine"] <= 1.0 + 1e-6
    assert 0.0 < result["minilm_int8_size_ratio"] < 0.5  # int8 weights and embedding table
    assert result["minilm_int8_speedup"] > 0 and result["digits_int8_speedup"] > 0
    assert -5.0 < result["digits_int8_accuracy_drop_pt"] < 5.0
    if result["distilled_escalated_fraction"] is None:
        assert result["distillation_note"]
    for name, batch in (("digits-cnn", 256), ("minilm", 32)):
        table = result["tables"][name]
        assert table["batch"] == batch
        rows = table["rows"]
        assert {"fp32 onnx", "pytorch eager", "int8 static qdq", "fp16"} <= set(rows)
        fp32 = rows["fp32 onnx"]
        assert fp32["throughput_vs_fp32"] == 1.0 and fp32["size_ratio"] == 1.0
        assert rows["pytorch eager"]["throughput_vs_eager"] == 1.0
        assert rows["fp16"]["size_ratio"] < 0.6  # half the bytes of the weights
        for row in rows.values():
            assert 0.0 < row["quality"] <= 1.0 + 1e-6
    assert "digits-cnn (accuracy" in done.stdout and "minilm (mean_cosine" in done.stdout
    # MiniLM: int8 compared with the shipped (fused) fp32 and with the plain export too.
    minilm = result["tables"]["minilm"]["rows"]
    assert {"fp32 onnx plain", "int8 dynamic plain", "int8 edge (shipped)"} <= set(minilm)
    assert result["minilm_int8_method"] == "int8 edge (shipped)"  # --quick: no search
    assert result["minilm_int8_config"] == minilm["int8 edge (shipped)"]["config"]
    for key in ("minilm_int8_speedup_vs_plain_fp32", "minilm_fp32_fused_speedup_vs_plain"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert minilm["fp32 onnx plain"]["quality"] > 0.9999  # fusion changes no output
    assert minilm["fp32 onnx plain"]["throughput_vs_plain"] == 1.0
