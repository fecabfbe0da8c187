"""Child processes for the demo: started with logs to files, stopped cleanly."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import FoglineError

logger = logging.getLogger(__name__)


def die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, even by SIGKILL (Linux only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


class ProcessError(FoglineError, RuntimeError):
    """A child process exited or did not become ready."""


class ManagedProcess:
    """``fogline <args>`` in a child process; output goes to ``log_path``."""

    def __init__(
        self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        """``env``: extra variables; NOTE: secrets go here, never in ``args`` (``ps`` shows
        every user a command line, while /proc/PID/environ is readable by the owner only)."""
        self.name = name
        self.log_path = log_path
        self.restarts = 0
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self._args = args
        self._env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "fogline", *self._args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )

    def restart(self) -> None:
        """Start the same command again after it exited (its log goes on in the same file)."""
        if self.proc.poll() is None:
            raise ProcessError(f"{self.name} is still running")
        self.restarts += 1
        self.proc = self._spawn()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(
        self, url: str, timeout: float, check: Callable[[Any], bool] = lambda _doc: True
    ) -> None:
        """Poll ``url`` until it answers 200 and ``check(json)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProcessError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if check(json.loads(resp.read() or b"null")):
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.1)
        raise ProcessError(f"{self.name} not ready at {url} in {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %ss; killing it", self.name, timeout)
                self.proc.kill()
                self.proc.wait()
        self._log.close()
