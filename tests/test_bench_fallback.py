"""``python -m bench.fallback --quick --no-mlserver --json``: the JSON a reader relies on.

Real processes (the fallback, the load generator); timings are not checked, only that
every figure is there, positive, and that the headline keys say what was not measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_bench_reports_every_figure() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.fallback", "--quick", "--no-mlserver", "--json"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["mlserver_unavailable"] == "not run (--no-mlserver)"
    digits = doc["models"]["digits"]
    for c in ("1", "32"):
        run = digits["fogline"][c]
        assert run["requests_per_s"] > 0 and run["errors"] == 0
        assert 0 < run["p50_ms"] <= run["p99_ms"]
        assert digits["mean_batch_formed"][c] >= 1
        assert digits["vs_ceiling"][c] > 0
    assert "mlserver" not in digits and digits["vs_mlserver"] == {}
    assert set(digits["ceiling_rows_per_s"]) == {"1", "2", "4", "8", "16", "32"}
    batching = doc["batching"]["digits"]
    assert batching["max_batch"] == 32 and 1 <= batching["preferred_batch"] <= 32
    # Not measured here: no invented figures.
    assert doc["digits_vs_mlserver_c32"] is None
    assert doc["minilm_vs_mlserver_c32"] is None and doc["minilm_vs_ceiling_c32"] is None


def test_bench_refuses_unknown_models() -> None:
    from bench.fallback import main

    assert main(["--models", "digits,../x"]) == 1
