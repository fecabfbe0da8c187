"""Crash-safe file writes: a reader sees the old bytes or the new, never half."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (no rename: for files in a staging dir)."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically: write a temp file, fsync, rename, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_private(path: Path, data: bytes) -> None:
    """Atomically write a secret (a private key): mode 0600 from creation, never wider.

    The temp file is created with ``O_EXCL`` and mode 0600, so no other user can
    open it between creation and a later chmod.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)  # the umask cannot widen it, but it could narrow it oddly
    os.replace(tmp, path)
    fsync_dir(path.parent)
