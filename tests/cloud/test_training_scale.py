"""Training that scales out, for real: SIGKILL and resume, two gloo processes, progress.

- A training subprocess is killed (SIGKILL) once its first checkpoint exists,
  resumed, and ends at the same metrics as an uninterrupted run with the same
  seed (the CNN: augmentation and dropout draw from the RNG the checkpoint saves).
- ``torchrun`` with two CPU processes (gloo, DistributedDataParallel) reaches
  the one-process accuracy, and only rank 0 writes.
- The progress display: a live bar on a terminal, plain lines in a log.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cloud.pipeline.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_latest,
    save_checkpoint,
)
from cloud.pipeline.progress import LineProgress, RichProgress, default_progress, format_eta
from fogline.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(argv: list[str]) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*torchrun, "--nproc_per_node", "2", "-m", "fogline", "--log-level", "WARNING", *argv]


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def _wait_for_checkpoint(directory: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not list_checkpoints(directory):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.mark.slow  # about a minute on 2 cores: run with -m slow
def test_killed_training_resumes_to_the_same_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = ["model", "train", "--model", "digits-cloud", "--epochs", "2", "--seed", "5"]
    ref = tmp_path / "ref.json"
    assert main([*run, "--out", str(tmp_path / "ref.onnx"), "--metrics-out", str(ref)]) == 0
    reference = _metrics(ref)

    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.onnx"
    resumable = [*run, "--out", str(out), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fogline", "--log-level", "WARNING", *resumable],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_checkpoint(ckpt, proc, timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    saved = load_latest(ckpt)
    assert saved is not None and 0 < saved["global_step"] < reference["steps"]

    caplog.set_level(logging.INFO, logger="cloud.pipeline.checkpoint")
    metrics_out = tmp_path / "resumed.json"
    assert main([*resumable, "--resume", "--metrics-out", str(metrics_out)]) == 0
    assert "resuming from" in caplog.text
    resumed = _metrics(metrics_out)
    assert resumed["steps"] == reference["steps"]
    assert resumed["val_accuracy"] == pytest.approx(reference["val_accuracy"], abs=1e-9)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)


def test_resume_refuses_a_changed_configuration(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    argv = ["model", "train", "--model", "digits-edge", "--epochs", "1", "--seed", "1"]
    argv += ["--out", str(tmp_path / "m.onnx"), "--checkpoint-dir", str(ckpt)]
    assert main([*argv, "--checkpoint-every", "4"]) == 0
    assert [p.name for p in list_checkpoints(ckpt)] == ["ckpt-00000012.pt", "ckpt-00000016.pt"]
    argv[argv.index("--seed") + 1] = "2"
    assert main([*argv, "--resume"]) == 1  # one error line: seed changed


def test_checkpoints_are_atomic_and_pruned(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"config": {}, "global_step": step})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    (tmp_path / "ckpt-00000004.pt").write_bytes(b"torn")  # as if written by something else
    state = load_latest(tmp_path)
    assert state is not None and state["global_step"] == 3
    from cloud.pipeline.checkpoint import check_config

    with pytest.raises(CheckpointError, match="seed: checkpoint 1 vs now 2"):
        check_config({"seed": 1}, {"seed": 2})


def test_two_gloo_processes_reach_the_one_process_accuracy(tmp_path: Path) -> None:
    run = ["model", "train", "--model", "digits-edge", "--epochs", "10", "--seed", "0"]
    one_json = tmp_path / "one.json"
    assert main([*run, "--out", str(tmp_path / "one.onnx"), "--metrics-out", str(one_json)]) == 0
    one = _metrics(one_json)
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    result = subprocess.run(
        _torchrun([*run, "--out", str(two_dir / "m.onnx"), "--metrics-out",
                   str(two_dir / "m.json"), "--checkpoint-dir", str(two_dir / "ckpt"),
                   "--checkpoint-every", "50"]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    two = _metrics(two_dir / "m.json")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["steps"] == one["steps"]  # batch 64 = 2 ranks x 32 rows per step
    assert abs(two["val_accuracy"] - one["val_accuracy"]) <= 0.02, (one, two)
    assert two["onnx_val_accuracy"] == pytest.approx(two["val_accuracy"], abs=0.01)
    # Rank 0 alone wrote: one "wrote" line, one ONNX file, no stray temp files.
    assert result.stdout.count("wrote ") == 1, result.stdout
    assert result.stderr.count("training digits-edge") == 1
    assert sorted(p.name for p in two_dir.iterdir()) == ["ckpt", "m.json", "m.onnx"]
    assert [p.name for p in list_checkpoints(two_dir / "ckpt")] == [
        "ckpt-00000100.pt",
        "ckpt-00000150.pt",
    ]
    print(f"1 process: {one}\n2 processes: {two}")


@pytest.mark.slow
def test_killed_two_process_training_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    """The whole torchrun job is SIGKILLed after rank 0's first checkpoint, then resumed."""
    run = ["model", "train", "--model", "digits-cloud", "--epochs", "2", "--seed", "3"]
    ref = tmp_path / "ref.json"
    done = subprocess.run(
        _torchrun([*run, "--out", str(tmp_path / "ref.onnx"), "--metrics-out", str(ref)]),
        env=_env(),
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "resumed.json"
    resumable = [*run, "--out", str(tmp_path / "m.onnx"), "--metrics-out", str(metrics)]
    resumable += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "5"]
    proc = subprocess.Popen(
        _torchrun(resumable),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes every rank
    )
    try:
        _wait_for_checkpoint(ckpt, proc, timeout=240)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not metrics.exists()
    again = subprocess.run(
        _torchrun([*resumable, "--resume"]), env=_env(), capture_output=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    reference, resumed = _metrics(ref), _metrics(metrics)
    assert resumed["steps"] == reference["steps"]
    assert resumed["val_accuracy"] == pytest.approx(reference["val_accuracy"], abs=1e-9)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_live_bar_with_loss_rate_and_eta() -> None:
    stream = _Terminal()
    show = default_progress(stream)
    assert isinstance(show, RichProgress)
    bar = RichProgress(stream, force_terminal=True)
    bar.start(total_steps=4, epochs=2)
    for epoch in (1, 2):
        bar.step(1, 64, 0.5)
        bar.step(1, 64, 0.25)
        bar.epoch_end(epoch, 2, 0.25, "val acc 95.00%")
    bar.close()
    text = stream.getvalue()
    assert "\x1b[" in text  # drawn in place with terminal control codes
    assert "4/4" in text and "loss 0.2500" in text and "samples/s" in text and "ETA" in text
    assert "val acc 95.00%" in text and "epoch 2/2" in text


def test_progress_in_a_log_is_plain_lines() -> None:
    stream = io.StringIO()
    assert isinstance(default_progress(stream), LineProgress)
    now = [0.0]
    show = LineProgress(stream, clock=lambda: now[0])
    show.start(total_steps=40, epochs=20)
    for epoch in range(1, 21):
        now[0] += 0.5
        show.step(2, 128, 0.1)
        show.epoch_end(epoch, 20, 0.1, "val acc 90.00%")
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # every tenth of the run
    assert lines[0] == (
        "epoch 2/20  step 4/40  loss 0.1000  val acc 90.00%  256 samples/s  ETA 0:09"
    )
    assert lines[-1].endswith("ETA 0:00")


def test_format_eta() -> None:
    assert [format_eta(s) for s in (0, 59.4, 61, 3725)] == ["0:00", "0:59", "1:01", "1:02:05"]
    assert format_eta(float("nan")) == "?"


def test_distributed_context_reads_torchrun_variables() -> None:
    from cloud.pipeline.distributed import DistContext
    from common.errors import InvalidInputError

    ctx = DistContext.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (1, 2, True, False)
    assert ctx.backend == ("nccl" if torch.cuda.is_available() else "gloo")
    assert DistContext.from_env({}) == DistContext()
    with pytest.raises(InvalidInputError):
        DistContext.from_env({"RANK": "2", "WORLD_SIZE": "2"})
