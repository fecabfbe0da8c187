"""MLServer 1.7.1, the peer ``bench.fallback`` compares against, in its own venv.

MLServer 1.7 ships no ONNX runtime, so each model is served by the small
custom ``MLModel`` below (ONNX Runtime, NumPy codec), the way its docs show a
custom runtime, with MLServer's adaptive batching (max 32, 5 ms). The venv
(``.bench/mlserver-venv``) is made on first use from the package index;
MLServer needs ``uvloop==0.21.0`` (0.23 crashes its worker at model load).
Its SIGTERM can hang: it is stopped by PID with a timeout, then killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

VENV = Path(__file__).resolve().parents[1] / ".bench" / "mlserver-venv"
PINS = ["mlserver==1.7.1", "uvloop==0.21.0", "onnxruntime", "numpy"]
MAX_BATCH_SIZE = 32
MAX_BATCH_TIME_S = 0.005

RUNTIME = """
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            self.settings.parameters.uri, opts, providers=["CPUExecutionProvider"]
        )
        self.names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outs = self.session.run(self.names, feeds)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(n, o) for n, o in zip(self.names, outs)],
        )
"""


class PeerUnavailable(RuntimeError):
    """MLServer could not be installed or started: the reason goes into the output."""


def ensure_venv(venv: Path = VENV) -> Path:
    """The venv's ``mlserver`` executable, creating the venv on first use."""
    exe = venv / "bin" / "mlserver"
    if exe.exists():
        return exe
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", *PINS],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise PeerUnavailable(f"cannot install MLServer ({' '.join(step[:3])}): {tail[0]}")
    return exe


def write_repository(root: Path, models: dict[str, Path]) -> Path:
    """An MLServer model repository: one folder per model, settings and the runtime."""
    root.mkdir(parents=True, exist_ok=True)
    for name, model_file in models.items():
        folder = root / name
        folder.mkdir(exist_ok=True)
        (folder / "onnx_runtime.py").write_text(RUNTIME)
        settings = {
            "name": name,
            "implementation": "onnx_runtime.OnnxModel",
            "max_batch_size": MAX_BATCH_SIZE,
            "max_batch_time": MAX_BATCH_TIME_S,
            "parameters": {"uri": str(model_file.resolve())},
        }
        (folder / "model-settings.json").write_text(json.dumps(settings))
    return root


class MLServer:
    def __init__(self, root: Path, http_port: int, grpc_port: int, metrics_port: int) -> None:
        self.root = root
        self.url = f"http://127.0.0.1:{http_port}"
        settings = {
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
            "debug": False,
        }
        (root / "settings.json").write_text(json.dumps(settings))
        self.log = root / "mlserver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, models: list[str], timeout_s: float = 240.0) -> None:
        exe = ensure_venv()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(exe), "start", str(self.root)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,  # it writes a .metrics/ folder where it runs
                start_new_session=True,  # its worker processes go with it on stop
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"MLServer exited at start: {self._tail()}")
            if all(_ready(f"{self.url}/v2/models/{m}/ready") for m in models):
                return
            time.sleep(0.5)
        self.stop()
        raise PeerUnavailable(f"MLServer not ready within {timeout_s:.0f} s: {self._tail()}")

    def _tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def stop(self, timeout_s: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # the group this Popen started, by its id
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout_s)
                return
            except subprocess.TimeoutExpired:
                continue


def _ready(url: str) -> bool:
    import asyncio

    async def probe() -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=2)
            async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    return asyncio.run(probe())
