"""``fogline demo --model minilm``: the whole loop with the pre-trained MiniLM, as a user runs it.

Slow (export, quantisation and reference embeddings first: minutes on two cores).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_minilm_demo_report(tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fogline",
            "demo",
            "--model",
            "minilm",
            "--json",
            "--agents",
            "2",
            "--samples",
            "60",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["model"] == "minilm" and report["rollout_state"] == "succeeded"
    for agent in report["agents"]:
        assert (agent["model"], agent["version"], agent["state"]) == ("minilm", "1", "online")
    cos = report["mean_cosine"]
    assert cos["cloud"] > 0.9999
    assert cos["edge"] >= 0.99 and cos["hybrid"] >= 0.99
    assert report["offline_mean_cosine"]["int8"] >= 0.99
    # Every text over the edge's 128 tokens, and only those, went to the cloud as heavy.
    over = report["texts_over_edge_limit"]
    assert over > 0
    assert report["escalation_reasons"] == {"heavy": over}
    assert report["escalated_fraction"] == round(over / report["samples"], 4)
    assert 400 <= report["too_long_status"] < 500
    assert report["errors"] == 0 and report["degraded"] == 0
    assert report["model_bytes"]["int8"] < 0.3 * report["model_bytes"]["fp32"]
    for key in ("local_p50", "local_p99", "escalated_p50", "escalated_p99"):
        assert report["latency_ms"][key] > 0


def test_demo_help_names_the_models() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fogline", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert "--model {digits,minilm}" in out.stdout and "default: digits" in out.stdout


def test_unknown_demo_model_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fogline", "demo", "--model", "gpt5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "invalid choice" in out.stderr
