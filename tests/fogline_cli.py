"""Run the ``fogline`` command as a user would: a child process, output captured."""

from __future__ import annotations

import os
import subprocess
import sys
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
