"""Distilled vs plainly trained edge student, judged by what the hybrid system escalates.

``python -m bench.compression_distill [--json] [--quick]``

One run trains the digits cloud CNN (the teacher), the edge MLP plainly and the
same MLP distilled from the teacher (``cloud.pipeline.distill``), each seeded
alike, and exports all three to ONNX. On the held-out test rows it reports each
student's accuracy and, for a target hybrid accuracy (the teacher's, less
``TARGET_GAP_PT``), the smallest share of requests each student must escalate
to the teacher under max-prob uncertainty routing to reach it
(``cloud.pipeline.hybrid``). The full run repeats the students over several
seeds and reports the means (the test split is 360 rows: one row is 0.28
points, so a single seed's difference is noise-sized).

NOTE: the thresholds are chosen on the test rows themselves, for both students
alike: a paired comparison of the two at equal hybrid accuracy, not a
prediction of the accuracy a threshold calibrated elsewhere would give.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cloud.pipeline import digits
from cloud.pipeline.data import load_digits_split
from cloud.pipeline.distill import DistillSettings, distill
from cloud.pipeline.export import export_onnx
from cloud.pipeline.hybrid import fraction_for_accuracy
from cloud.pipeline.onnx_model import predict
from cloud.pipeline.train import train_model
from cloud.pipeline.zoo import entry

TARGET_GAP_PT = 0.0  # target hybrid accuracy: the teacher's (cloud-only quality) less this
SEEDS = {True: (0,), False: (0, 1, 2)}
EPOCHS: dict[bool, dict[str, int | None]] = {
    True: {"cloud": 8, "edge": 20},
    False: {"cloud": None, "edge": None},
}


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())


def measure(quick: bool = False, settings: DistillSettings | None = None) -> dict[str, Any]:
    """Train teacher and students, return the figures (see the module docstring)."""
    settings = settings or DistillSettings()
    split = load_digits_split(digits.DATA_SEED)
    epochs = EPOCHS[quick]
    edge_recipe = entry("digits-edge").recipe.override(epochs=epochs["edge"])
    with tempfile.TemporaryDirectory(prefix="fogline-distill-") as tmp:
        teacher_path = export_onnx(
            train_model("cloud", split, epochs=epochs["cloud"], seed=0), Path(tmp) / "t.onnx"
        )
        teacher = predict(teacher_path, split.x_test)
        teacher_acc = _accuracy(teacher, split.y_test)
        target = teacher_acc - TARGET_GAP_PT / 100.0
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "distilled": []}
        for seed in SEEDS[quick]:
            plain = train_model("edge", split, epochs=epochs["edge"], seed=seed)
            taught = distill(
                digits.edge_model,
                digits.training_data(split),
                teacher_path,
                edge_recipe,
                settings=settings,
                seed=seed,
            ).model
            for kind, model in (("plain", plain), ("distilled", taught)):
                probs = predict(export_onnx(model, Path(tmp) / f"{kind}-{seed}.onnx"), split.x_test)
                op = fraction_for_accuracy(probs, teacher, split.y_test, target)
                runs[kind].append(
                    {
                        "accuracy": _accuracy(probs, split.y_test),
                        "escalated_fraction": op.escalated_fraction,
                        "hybrid_accuracy": op.hybrid_accuracy,
                        "threshold": op.threshold,
                    }
                )

    def mean(kind: str, key: str) -> float:
        return statistics.fmean(r[key] for r in runs[kind])

    plain_frac, taught_frac = (
        mean("plain", "escalated_fraction"),
        mean("distilled", "escalated_fraction"),
    )
    return {
        "quick": quick,
        "seeds": list(SEEDS[quick]),
        "test_rows": len(split.y_test),
        "temperature": settings.temperature,
        "alpha": settings.alpha,
        "teacher_accuracy": teacher_acc,
        "matched_hybrid_accuracy": target,
        "plain_accuracy": mean("plain", "accuracy"),
        "distilled_accuracy": mean("distilled", "accuracy"),
        "plain_escalated_fraction": plain_frac,
        "distilled_escalated_fraction": taught_frac,
        "plain_hybrid_accuracy": mean("plain", "hybrid_accuracy"),
        "distilled_hybrid_accuracy": mean("distilled", "hybrid_accuracy"),
        "escalation_ratio": taught_frac / plain_frac if plain_frac else None,
        "runs": runs,
    }


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"teacher (cloud CNN) accuracy {r['teacher_accuracy']:.2%}; target hybrid accuracy "
        f"{r['matched_hybrid_accuracy']:.2%} ({r['test_rows']} test rows, seeds {r['seeds']})",
        f"{'student':<10} {'accuracy':>9} {'escalated':>10} {'hybrid acc':>11}",
    ]
    for kind in ("plain", "distilled"):
        lines.append(
            f"{kind:<10} {r[f'{kind}_accuracy']:>9.2%} {r[f'{kind}_escalated_fraction']:>10.2%} "
            f"{r[f'{kind}_hybrid_accuracy']:>11.2%}"
        )
    ratio = r["escalation_ratio"]
    shown = "n/a (plain escalates nothing)" if ratio is None else f"{ratio:.2f}x"
    lines.append(f"distilled / plain escalations: {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="one seed, fewer epochs")
    args = parser.parse_args(argv)
    result = measure(args.quick)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
