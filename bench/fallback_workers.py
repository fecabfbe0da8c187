"""Does a second fallback process behind the same port (SO_REUSEPORT) help on this host?

One process with one ONNX Runtime thread per core, against two processes with
one thread each sharing the port (the kernel spreads connections), at 32
clients, interleaved. Measured, not built into ``fogline fallback serve``:
it is added there only if it helps.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.signing import Signer
from fogline.broker import free_port

WORKER = """
import asyncio, sys
from pathlib import Path
from aiohttp import web
from cloud.fallback import FallbackSettings, build_fallback_app

async def main(port, threads, key, packages):
    settings = FallbackSettings(packages=[Path(p) for p in packages], trusted_keys=[key],
                                intra_op_threads=threads)
    runner = web.AppRunner(await build_fallback_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
"""


def _start(processes: int, threads: int, key: str, packages: list[Path]) -> tuple[int, list]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(port), str(threads), key, *map(str, packages)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ},
        )
        for _ in range(processes)
    ]
    deadline = time.monotonic() + 300
    # Each process answers on the shared port once up; wait until every one has loaded.
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                pass
            time.sleep(2 if processes > 1 else 0)  # the others load at the same pace
            return port, procs
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    _stop(procs)
    raise RuntimeError("reuse-port workers did not start")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def compare_workers(
    models: list[Any],
    signer: Signer,
    args: Any,
    workdir: Path,
    loadgen: Callable[..., dict],
    timing: Callable[..., tuple[float, float]],
) -> dict[str, Any]:
    chosen = [m for m in models if m.key in ("digits", "minilm_int8")]
    if not chosen:
        return {"skipped": "needs digits or minilm_int8"}
    configs = {"one_process": (1, 0), "two_processes": (2, 1)}  # (processes, ORT threads each)
    samples: dict[str, dict[str, list[float]]] = {m.key: {k: [] for k in configs} for m in chosen}
    key = signer.public_key_hex
    for rnd in range(args.rounds):
        order = list(configs) if rnd % 2 == 0 else list(reversed(configs))
        for name in order:
            processes, threads = configs[name]
            port, procs = _start(processes, threads, key, [m.package for m in chosen])
            try:
                for m in chosen:
                    body = workdir / f"{m.key}.json"
                    body.write_bytes(m.body)
                    url = f"http://127.0.0.1:{port}/v2/models/{m.name}/infer"
                    r = loadgen(url, body, 32, *timing(m, args))
                    samples[m.key][name].append(r["requests_per_s"])
            finally:
                _stop(procs)
    out: dict[str, Any] = {"cores": os.cpu_count(), "clients": 32}
    for m, by in samples.items():
        one, two = statistics.median(by["one_process"]), statistics.median(by["two_processes"])
        out[m] = {"one_process": one, "two_processes": two, "ratio": round(two / one, 2)}
    return out
