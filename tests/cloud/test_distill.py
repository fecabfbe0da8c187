"""Distillation and what it buys the hybrid system: the loss, the escalation maths, the
training through the one loop, and the benchmark's measurement mechanics (not who wins)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cloud.pipeline import digits
from cloud.pipeline.data import load_digits_split
from cloud.pipeline.distill import DistillSettings, distill, distillation_loss, teacher_log_probs
from cloud.pipeline.hybrid import escalation_curve, fraction_for_accuracy, hybrid_at
from cloud.pipeline.recipe import Recipe
from common.errors import InvalidInputError
from tests.model_fixtures import onnx_model_bytes


def _probs(rng: np.random.Generator, n: int, sharp: float) -> np.ndarray:
    logits = rng.standard_normal((n, 10)) * sharp
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_escalation_curve_runs_from_the_student_to_the_teacher() -> None:
    rng = np.random.default_rng(0)
    student, teacher = _probs(rng, 200, 1.0), _probs(rng, 200, 3.0)
    labels = teacher.argmax(1).copy()
    labels[:10] = (labels[:10] + 1) % 10  # the teacher is wrong on a few rows
    _, fractions, accuracy = escalation_curve(student, teacher, labels)
    assert fractions[0] == 0 and fractions[-1] == 1
    assert accuracy[0] == pytest.approx((student.argmax(1) == labels).mean())
    assert accuracy[-1] == pytest.approx(0.95)  # everything escalated: the teacher's
    target = 0.9
    op = fraction_for_accuracy(student, teacher, labels, target)
    assert op.hybrid_accuracy >= target
    # the figures are what an agent with this threshold does ...
    assert hybrid_at(student, teacher, labels, op.threshold) == op
    # ... and no smaller share of escalations reaches the target
    k = round(op.escalated_fraction * len(labels))
    assert k > 0 and accuracy[k - 1] < target


def test_an_unreachable_target_gives_the_best_the_pair_can_do() -> None:
    rng = np.random.default_rng(1)
    student, teacher = _probs(rng, 50, 1.0), _probs(rng, 50, 1.0)
    labels = rng.integers(0, 10, 50)
    op = fraction_for_accuracy(student, teacher, labels, target=1.01)
    assert op.hybrid_accuracy == pytest.approx(escalation_curve(student, teacher, labels)[2].max())


def test_the_distillation_loss_mixes_soft_and_hard_terms() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    idx = torch.arange(8)
    teacher = torch.log_softmax(logits, dim=-1)  # a teacher that agrees with the student
    hard_only = distillation_loss(teacher, DistillSettings(4.0, 0.0))(logits, labels, idx)
    assert hard_only == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))
    soft_only = distillation_loss(teacher, DistillSettings(4.0, 1.0))(logits, labels, idx)
    assert abs(float(soft_only)) < 1e-5  # KL of identical distributions
    other = torch.log_softmax(torch.randn(8, 10), dim=-1)
    assert float(distillation_loss(other, DistillSettings(4.0, 1.0))(logits, labels, idx)) > 0.01
    with pytest.raises(InvalidInputError):
        DistillSettings(temperature=0.0).check()


def test_a_student_trains_from_an_onnx_teacher_through_the_loop(tmp_path) -> None:
    teacher = tmp_path / "teacher.onnx"
    teacher.write_bytes(onnx_model_bytes(0))  # any classifier with probabilities out
    split = load_digits_split(digits.DATA_SEED)
    data = digits.training_data(split)
    logp = teacher_log_probs(teacher, data.train_inputs)
    assert logp.shape == (len(split.y_train), 10)
    assert torch.allclose(logp.exp().sum(1), torch.ones(len(logp)), atol=1e-4)
    result = distill(digits.edge_model, data, teacher, Recipe(epochs=1, batch_size=256), seed=0)
    assert result.steps == math.ceil(len(split.y_train) / 256)
    assert result.val_accuracy is not None and math.isfinite(result.train_loss)
    with pytest.raises(InvalidInputError, match="cannot take the data"):
        bad = {"input": torch.zeros(4, 3)}
        teacher_log_probs(teacher, bad)


@pytest.mark.slow
def test_the_benchmark_measures_both_students_at_the_same_hybrid_accuracy() -> None:
    from bench.compression_distill import measure

    r = measure(quick=True)
    for kind in ("plain", "distilled"):
        assert 0.0 <= r[f"{kind}_escalated_fraction"] <= 1.0
        assert 0.5 < r[f"{kind}_accuracy"] <= 1.0
        (run,) = r["runs"][kind]
        # either the target was met, or nothing reaches it and this is the best there is
        assert run["hybrid_accuracy"] >= r["matched_hybrid_accuracy"] - 1e-9 or run[
            "escalated_fraction"
        ] in (0.0, 1.0)
    ratio = r["escalation_ratio"]
    plain = r["plain_escalated_fraction"]
    assert (
        ratio is None
        if plain == 0
        else ratio == pytest.approx(r["distilled_escalated_fraction"] / plain)
    )


def test_fogline_model_distill_writes_the_student_and_its_sidecar(tmp_path) -> None:
    from cloud.pipeline.sidecar import read_sidecar
    from common.manifest import sha256_file
    from tests.fogline_cli import fogline

    teacher = tmp_path / "teacher.onnx"
    teacher.write_bytes(onnx_model_bytes(0))
    out = tmp_path / "student.onnx"
    result = fogline(
        "model", "distill", "--teacher", str(teacher), "--epochs", "1", "--out", str(out),
        "--max-drop", "100", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "distill" and report["params"]["temperature"] == 4.0
    sidecar = read_sidecar(out)
    assert sidecar is not None and sidecar.parent_sha256 == sha256_file(teacher)
    assert sidecar.metrics["quality"] == report["accuracy"]
    bad = fogline("model", "distill", "--teacher", str(teacher), "--alpha", "2", "--out", "x.onnx")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "alpha" in bad.stderr
