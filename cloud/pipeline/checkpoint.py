"""Training checkpoints: written atomically, found again after a crash.

A checkpoint holds everything the next step depends on (weights, optimizer
and scheduler state, where in which epoch's data order we are, the running
loss, torch's RNG state), so a resumed run takes exactly the steps the
uninterrupted one would have taken. Files are ``ckpt-<step>.pt``; a file
appears under its final name only when complete (write, fsync, rename), so a
SIGKILL at any instant leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from common.errors import FoglineError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
KEEP = 2  # the newest, and one before it in case the newest is somehow unreadable


class CheckpointError(FoglineError, ValueError):
    """A checkpoint cannot be read, or belongs to a different run configuration."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` as the checkpoint for ``step``; prune all but the newest ``KEEP``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-KEEP]:
        old.unlink(missing_ok=True)
    logger.debug("checkpoint %s", final)
    return final


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_latest(directory: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint's state, or None when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: try the one before
            logger.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        if not isinstance(state, dict) or "config" not in state:
            logger.warning("skipping %s: not a Fogline checkpoint", path)
            continue
        logger.info("resuming from %s (step %s)", path, state.get("global_step"))
        return state  # type: ignore[no-any-return]
    return None


def check_config(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a run whose configuration (seed, data, batch, world size) changed."""
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"cannot resume: the run configuration changed ({detail})")
