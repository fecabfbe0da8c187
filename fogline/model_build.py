"""The demo's model work: train both variants, compress the edge one, package, publish.

The edge model is the shipped one (``cloud.pipeline.edge_student``): the digits
MLP distilled from the cloud CNN, with its calibrated threshold. ``publish_retrained`` is the
hard-example turn's half: the same student fine-tuned with the fleet's hard
examples added to its training rows, published as the next version.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud.control_cli import ControlClient
from fogline.build_cache import cached_build, key_of

logger = logging.getLogger(__name__)

CLOUD_FILE = "cloud-fp32.onnx"
STUDENT_FILE = "edge-student.pt"
EDGE_FP32_FILE = "edge-fp32.onnx"
TRAINED_FILES = (CLOUD_FILE, STUDENT_FILE, EDGE_FP32_FILE)


def build_and_publish(
    workdir: Path,
    control: ControlClient,
    name: str,
    version: str,
    *,
    seed: int,
    progress: bool,
    cache: Path | None = None,
) -> tuple[dict[str, Any], Any]:
    """Publish both variants as ``version``; return (compression figures, the data split).

    With ``cache``, the trained models come from there when the same seed and the same
    training code made them before (``fogline.build_cache``)."""
    from cloud.pipeline.compress import evaluate
    from cloud.pipeline.data import load_digits_split
    from cloud.pipeline.package import build_package
    from common.manifest import ACCURACY, RoutingHints, write_unsigned

    workdir.mkdir(parents=True, exist_ok=True)
    split = load_digits_split(seed)
    if cache is None:
        _train(workdir, split, seed, progress)
        from_cache = False
    else:
        from_cache = cached_build(
            cache,
            _training_key(seed),
            TRAINED_FILES,
            lambda into: _train(into, split, seed, progress),
            workdir,
        )
    cloud, edge = workdir / CLOUD_FILE, workdir / EDGE_FP32_FILE
    report = _publish_edge(edge, workdir, control, name, version, 1, None, split)
    cloud_acc = evaluate(cloud, split.x_test, split.y_test)
    cloud_manifest = build_package(
        cloud,
        workdir / "pkg-cloud",
        name=name,
        version=version,
        release=1,
        variant="cloud",
        precision="fp32",
        golden_rows=split.x_test[:8],
        evaluation={ACCURACY: cloud_acc},
        routing=RoutingHints(uncertainty_threshold=1.0, max_local_batch=1 << 20),
    )
    write_unsigned(workdir / "pkg-cloud", cloud_manifest)
    control.publish(workdir / "pkg-cloud")
    figures = {
        **report,
        "cloud_fp32_accuracy": cloud_acc,
        "cloud_bytes": (workdir / CLOUD_FILE).stat().st_size,
        "trained_models_from_cache": from_cache,
    }
    return figures, split


def _train(workdir: Path, split: Any, seed: int, progress: bool) -> None:
    """Write ``TRAINED_FILES``: the cloud CNN, and the edge student distilled from it."""
    from cloud.pipeline.edge_student import save_student, train_student
    from cloud.pipeline.export import export_onnx
    from cloud.pipeline.train import default_progress, train_model

    show = default_progress() if progress else None
    logger.info("training the cloud model (larger CNN)")
    cloud = export_onnx(train_model("cloud", split, seed=seed, progress=show), workdir / CLOUD_FILE)
    logger.info("training the edge model (small MLP, distilled from the cloud model)")
    student = train_student(split, cloud, seed=seed, progress=show)
    save_student(student, workdir / STUDENT_FILE)  # what the hard-example turn fine-tunes
    export_onnx(student, workdir / EDGE_FP32_FILE)


def _training_key(seed: int) -> str:
    """Training is seeded: the same seed, training code and library versions give the
    same models. Any change to the pipeline's source makes a new key."""
    import sklearn
    import torch

    import cloud.pipeline

    sources = sorted(Path(cloud.pipeline.__file__).parent.glob("*.py"))
    return key_of(f"digits seed={seed}", torch.__version__, sklearn.__version__, files=sources)


def _publish_edge(
    fp32: Path,
    workdir: Path,
    control: ControlClient,
    name: str,
    version: str,
    release: int,
    parent: str | None,
    split: Any,
) -> dict[str, Any]:
    """int8 (gated: at most 1 point lost), the shipped threshold, packaged and published."""
    from cloud.pipeline.compress import compress
    from cloud.pipeline.edge_student import shipped_routing
    from cloud.pipeline.package import build_package
    from common.manifest import ACCURACY, write_unsigned

    int8 = fp32.with_name(fp32.stem.replace("fp32", "int8") + ".onnx")
    report = compress(fp32, int8, split, max_drop_points=1.0)  # raises past 1 point
    routing = shipped_routing(int8, split)
    directory = workdir / f"pkg-edge-{version}"
    manifest = build_package(
        int8,
        directory,
        name=name,
        version=version,
        release=release,
        variant="edge",
        precision="int8",
        golden_rows=split.x_test[:8],
        evaluation={ACCURACY: report.int8_accuracy},
        routing=routing,
        parent=parent,
    )
    write_unsigned(directory, manifest)
    control.publish(directory)
    return {**report.to_dict(), "threshold": routing.uncertainty_threshold}


def fetch_hard_examples(control: ControlClient, name: str) -> dict[str, np.ndarray]:
    """What ``fogline model train --extra-data hard-examples:NAME`` reads: the data set the
    control plane keeps of the fleet's escalations, labelled with the cloud's answers."""
    with np.load(io.BytesIO(control.get_bytes(f"/api/hard-examples/{name}"))) as npz:
        return {k: npz[k] for k in npz.files}


def publish_retrained(
    workdir: Path,
    control: ControlClient,
    name: str,
    version: str,
    *,
    release: int,
    parent: str,
    split: Any,
    hard: dict[str, np.ndarray],
    seed: int,
) -> dict[str, Any]:
    """Fine-tune the shipped student with ``hard`` added, publish it as ``version``."""
    from cloud.pipeline.edge_student import train_student
    from cloud.pipeline.export import export_onnx

    started = time.monotonic()
    model = train_student(
        split,
        workdir / CLOUD_FILE,
        seed=seed,
        extra=hard,
        source=f"hard-examples:{name}",
        start_from=workdir / STUDENT_FILE,
    )
    fp32 = export_onnx(model, workdir / f"edge-{version}-fp32.onnx")
    train_s = time.monotonic() - started
    report = _publish_edge(fp32, workdir, control, name, version, release, parent, split)
    return {**report, "train_seconds": round(train_s, 2)}
