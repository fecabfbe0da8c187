"""``python -m bench.edge --quick --json`` end to end: every headline key, with sane values.

Timings are not asserted (the machine is shared); the shapes and the counts are.
Slow: it trains both digits models, packages MiniLM (export cached across runs)
and starts three agents, a broker and a control plane.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

KEYS = {
    "raw_us_b1": float,
    "server_us_b1": float,
    "http_floor_us_b1": float,
    "overhead_p50_ms_minilm": float,
    "minilm_raw_ms_p50": float,
    "minilm_server_ms_p50": float,
    "throughput_ratio_minilm": float,
    "throughput_ratio_digits": float,
    "cascade_escalated_fraction": float,
    "cascade_gap_pt": float,
    "cascade_target_met": bool,
    "cascade_gap_calibrated_escalated_fraction": float,
    "cascade_gap_calibrated_gap_pt": float,
    "hot_swap_failed_requests": int,
    "hot_swap_requests": int,
}


@pytest.mark.slow
def test_quick_bench_reports_every_key() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.edge", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key, kind in KEYS.items():
        assert isinstance(result[key], kind), (key, result[key])
    for key in ("raw_us_b1", "server_us_b1", "minilm_raw_ms_p50", "minilm_server_ms_p50"):
        assert result[key] > 0, key
    for key in ("throughput_ratio_minilm", "throughput_ratio_digits"):
        low, high = result[f"{key}_range"]
        assert 0 < low <= result[key] <= high, key
    assert 0.0 < result["cascade_escalated_fraction"] < 0.5
    assert result["cascade_test_rows"] > 300
    hybrid, cloud = result["cascade_hybrid_accuracy"], result["cascade_cloud_accuracy"]
    assert result["cascade_gap_pt"] == pytest.approx(100 * (cloud - hybrid), abs=0.01)
    assert result["cascade_target_met"] == (
        result["cascade_escalated_fraction"] <= 0.12 and result["cascade_gap_pt"] <= 0.3
    )
    # The load ran through the swap: both versions answered, and nothing failed.
    served = result["hot_swap_served_by_version"]
    assert served.get("v1", 0) > 0 and served.get("v2", 0) > 0, served
    assert result["hot_swap_failed_requests"] == 0
    assert result["hot_swap_requests"] == sum(served.values())
