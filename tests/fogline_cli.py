"""Run the ``fogline`` command as a user would: a child process, output captured."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Neither variable may leak in from the shell that runs the tests.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("FOGLINE_CONTROL", "FOGLINE_TOKEN")}


def fogline(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fogline", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**CLEAN_ENV, **(env or {})},
    )


# The cloud extra's libraries, absent from an edge-only install (`pip install '.[edge]'`).
CLOUD_LIBRARIES = ("torch", "onnx", "sklearn", "amqtt", "psycopg", "rich")
_WITHOUT = """
import importlib.abc, runpy, sys

MISSING = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
sys.argv = ["fogline", *sys.argv[2:]]
runpy.run_module("fogline", run_name="__main__")
"""


def fogline_without(
    missing: Iterable[str], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``fogline ARGS`` in a Python where importing the ``missing`` packages fails, as on
    an install without their extra (the packages are the outside world here)."""
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT, ",".join(missing), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**CLEAN_ENV, **(env or {})},
    )
