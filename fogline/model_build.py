"""The demo's model work: train both variants, compress the edge one, package, publish."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cloud.control_cli import ControlClient

logger = logging.getLogger(__name__)


def build_and_publish(
    workdir: Path, control: ControlClient, name: str, version: str, *, seed: int, progress: bool
) -> tuple[dict[str, Any], Any]:
    """Publish both variants as ``version``; return (compression figures, the data split)."""
    from cloud.pipeline.compress import compress, evaluate
    from cloud.pipeline.data import load_digits_split
    from cloud.pipeline.export import export_onnx
    from cloud.pipeline.package import build_package, calibrate_routing
    from cloud.pipeline.train import default_progress, train_model
    from common.manifest import ACCURACY, RoutingHints, write_unsigned

    workdir.mkdir(parents=True, exist_ok=True)
    split = load_digits_split(seed)
    show = default_progress() if progress else None
    logger.info("training the edge model (small MLP)")
    edge = export_onnx(
        train_model("edge", split, seed=seed, progress=show), workdir / "edge-fp32.onnx"
    )
    logger.info("training the cloud model (larger CNN)")
    cloud = export_onnx(
        train_model("cloud", split, seed=seed, progress=show), workdir / "cloud-fp32.onnx"
    )
    int8 = workdir / "edge-int8.onnx"
    report = compress(edge, int8, split, max_drop_points=1.0)  # raises past 1 point
    golden = split.x_test[:8]
    edge_manifest = build_package(
        int8,
        workdir / "pkg-edge",
        name=name,
        version=version,
        release=1,
        variant="edge",
        precision="int8",
        golden_rows=golden,
        evaluation={ACCURACY: report.int8_accuracy},
        routing=calibrate_routing(int8, split.x_val, escalate_fraction=0.15, max_local_batch=8),
    )
    cloud_acc = evaluate(cloud, split.x_test, split.y_test)
    cloud_manifest = build_package(
        cloud,
        workdir / "pkg-cloud",
        name=name,
        version=version,
        release=1,
        variant="cloud",
        precision="fp32",
        golden_rows=golden,
        evaluation={ACCURACY: cloud_acc},
        routing=RoutingHints(uncertainty_threshold=1.0, max_local_batch=1 << 20),
    )
    for manifest, directory in ((edge_manifest, "pkg-edge"), (cloud_manifest, "pkg-cloud")):
        write_unsigned(workdir / directory, manifest)
        control.publish(workdir / directory)
    figures = {
        **report.to_dict(),
        "cloud_fp32_accuracy": cloud_acc,
        "cloud_bytes": (workdir / "cloud-fp32.onnx").stat().st_size,
    }
    return figures, split
