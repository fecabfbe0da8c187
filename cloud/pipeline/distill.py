"""Knowledge distillation: train a small student from a larger teacher's soft answers.

The teacher is an ONNX file (the published cloud model, exactly as it
serves), so no PyTorch weights need to travel with it: its probabilities on
the training rows are computed once with ONNX Runtime. The student trains in
the one training loop (``cloud.pipeline.loop.fit``) with

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)

where ``_T`` is a softmax at temperature T (Hinton et al., 2015; the T^2 keeps
the soft term's gradients on the scale of the hard one's). The teacher's
outputs are probabilities, so its logits are taken as their logarithm: a
softmax does not see the per-row constant that loses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cloud.pipeline.factory import TrainingData
from cloud.pipeline.loop import LossFn, TrainResult, fit
from cloud.pipeline.onnx_model import run_outputs
from cloud.pipeline.progress import Progress
from cloud.pipeline.recipe import Recipe
from cloud.pipeline.train import training_context
from common.errors import InvalidInputError

logger = logging.getLogger(__name__)

_EPS = 1e-7


@dataclass(frozen=True)
class DistillSettings:
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft (teacher) term

    def check(self) -> None:
        if not 0.5 <= self.temperature <= 50.0:
            raise InvalidInputError(f"temperature must be in [0.5, 50], got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidInputError(f"alpha must be in [0, 1], got {self.alpha}")


def teacher_log_probs(teacher_onnx: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p of the teacher's first output for every row of ``inputs`` (ONNX Runtime)."""
    feeds = {k: v.cpu().numpy() for k, v in inputs.items()}
    try:
        out = next(iter(run_outputs(Path(teacher_onnx), feeds).values()))
    except Exception as exc:  # onnxruntime's own errors: a teacher that does not fit the data
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidInputError(f"teacher {teacher_onnx} cannot take the data: {first}") from exc
    probs = np.asarray(out, dtype=np.float64)
    if probs.ndim != 2 or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise InvalidInputError(
            f"teacher {teacher_onnx}: its first output is not class probabilities [N, C]"
        )
    return torch.from_numpy(np.log(np.clip(probs, _EPS, 1.0))).float()


def distillation_loss(teacher_logp: torch.Tensor, settings: DistillSettings) -> LossFn:
    """The loop's loss for rows ``idx`` of the train split: soft KL plus hard CE."""
    t, alpha = settings.temperature, settings.alpha

    def loss(out: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = out.float()
        soft_teacher = torch.log_softmax(teacher_logp[idx].to(logits.device) / t, dim=-1)
        soft_student = torch.log_softmax(logits / t, dim=-1)
        kl = nn.functional.kl_div(
            soft_student, soft_teacher, log_target=True, reduction="batchmean"
        )
        hard = nn.functional.cross_entropy(logits, labels)
        return alpha * t * t * kl + (1.0 - alpha) * hard

    return loss


def distill(
    make_student: Callable[[], nn.Module],
    data: TrainingData,
    teacher_onnx: Path,
    recipe: Recipe,
    *,
    settings: DistillSettings | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> TrainResult:
    """Train a student made by ``make_student`` (seeded) on ``data`` against the teacher."""
    settings = settings or DistillSettings()
    settings.check()
    if not data.is_classification:
        raise InvalidInputError("distillation needs a classification dataset (integer labels)")
    teacher = teacher_log_probs(teacher_onnx, data.train_inputs)
    if teacher.shape[0] != len(data.train_targets):
        raise InvalidInputError("the teacher gave a different number of rows than it was fed")
    with training_context(seed):
        student = make_student()
        result = fit(
            student,
            data,
            recipe,
            seed=seed,
            loss=distillation_loss(teacher, settings),
            progress=progress,
        )
    logger.info("distilled student: %s", result.metrics())
    return result
