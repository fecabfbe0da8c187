"""What an edge model buys the hybrid system: how many requests it must escalate.

The agent answers locally unless the local answer's uncertainty score is above
its threshold, and then takes the cloud model's answer. For a student and a
teacher scored on the same labelled rows, ``escalation_curve`` gives the
hybrid accuracy for every possible threshold (escalating the k most uncertain
rows, k = 0..N), and ``fraction_for_accuracy`` the smallest share of rows
escalated that reaches a target hybrid accuracy. Comparing two students at
the same target says which one costs the cloud less for the same quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.uncertainty import score


@dataclass(frozen=True)
class Operating:
    """One threshold: the share of rows escalated and the hybrid accuracy it gives."""

    threshold: float  # escalate rows whose score is above this
    escalated_fraction: float
    hybrid_accuracy: float


def escalation_curve(
    student_probs: np.ndarray,
    teacher_probs: np.ndarray,
    labels: np.ndarray,
    metric: str = "max_prob",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores sorted high to low, escalated fractions, hybrid accuracies), k = 0..N.

    Entry k escalates the k rows with the highest uncertainty score.
    """
    if not len(labels) == len(student_probs) == len(teacher_probs) or len(labels) == 0:
        raise ValueError("student, teacher and labels must cover the same, non-empty rows")
    scores = score(metric, student_probs)
    order = np.argsort(-scores, kind="stable")
    local_ok = (student_probs.argmax(axis=1) == labels)[order]
    cloud_ok = (teacher_probs.argmax(axis=1) == labels)[order]
    # correct answers when the first k rows (most uncertain) go to the cloud
    gained = np.concatenate([[0], np.cumsum(cloud_ok.astype(int) - local_ok.astype(int))])
    correct = int(local_ok.sum()) + gained
    n = len(labels)
    return scores[order], np.arange(n + 1) / n, correct / n


def hybrid_at(
    student_probs: np.ndarray,
    teacher_probs: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    metric: str = "max_prob",
) -> Operating:
    """What an agent with ``threshold`` does: escalate rows scoring above it."""
    escalate = score(metric, student_probs) > threshold
    answer = np.where(escalate, teacher_probs.argmax(axis=1), student_probs.argmax(axis=1))
    return Operating(threshold, float(escalate.mean()), float((answer == labels).mean()))


def fraction_for_accuracy(
    student_probs: np.ndarray,
    teacher_probs: np.ndarray,
    labels: np.ndarray,
    target: float,
    metric: str = "max_prob",
) -> Operating:
    """The threshold with the fewest escalations whose hybrid accuracy is at least
    ``target`` (if none reaches it: the one with the best hybrid accuracy).

    The figures are those of the threshold itself (``hybrid_at``): rows tied at the
    cut are escalated together, as an agent would.
    """
    sorted_scores, _, accuracy = escalation_curve(student_probs, teacher_probs, labels, metric)
    reached = np.flatnonzero(accuracy >= target - 1e-12)
    candidates = [int(k) for k in reached] if len(reached) else [int(np.argmax(accuracy))]
    best: Operating | None = None
    for k in candidates:
        op = hybrid_at(student_probs, teacher_probs, labels, _cut(sorted_scores, k), metric)
        if op.hybrid_accuracy >= target - 1e-12:
            return op
        if best is None or op.hybrid_accuracy > best.hybrid_accuracy:
            best = op
    assert best is not None
    return best


def _cut(sorted_scores: np.ndarray, k: int) -> float:
    """A threshold that escalates the first ``k`` rows of the sorted scores (and any row
    tied with the k-th)."""
    if k == 0:
        return float(np.nextafter(sorted_scores[0], np.inf))  # nothing above it
    value = float(sorted_scores[k - 1])
    if k == len(sorted_scores) or sorted_scores[k] == value:
        return float(np.nextafter(value, -np.inf))
    return (value + float(sorted_scores[k])) / 2.0
