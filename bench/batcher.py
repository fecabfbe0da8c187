"""The batcher in process, without HTTP: is batching and running fast models on the loop
worth it? ``python -m bench.batcher [--json] [--rounds N]``

Concurrent coroutines call ``infer`` on the digits CNN (the cloud variant), plain
(``OnnxRuntime``) and batched (``BatchingRuntime``), with runs under 200 µs kept on
the event loop (as served) or always sent to a worker thread, interleaved in rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common.batcher as batcher_module
from bench.fallback_models import digits
from common.batch_settings import BatchSettings
from common.batcher import BatchingRuntime
from common.inference import InferRequest, Tensor
from common.onnx_runtime import INLINE_BELOW_US, OnnxRuntime
from common.signing import Signer


async def drive(runtime: Any, x: Any, clients: int, seconds: float) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await runtime.infer(InferRequest("digits", [Tensor("input", x)]))
            done += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return done / seconds


async def measure(package: Path, x: Any, rounds: int, seconds: float) -> dict[str, Any]:
    from common.manifest import read_package

    manifest = read_package(package, None).manifest
    model = package / manifest.file("model").name
    samples: dict[str, list[float]] = {}
    for rnd in range(rounds):
        modes = ["loop", "thread"] if rnd % 2 == 0 else ["thread", "loop"]
        for mode in modes:
            bound = INLINE_BELOW_US if mode == "loop" else 0.0
            batcher_module.INLINE_BELOW_US = bound  # the batcher reads its module's name
            plain = OnnxRuntime(model, manifest, inline_below_us=bound)
            batched = BatchingRuntime(OnnxRuntime(model, manifest), BatchSettings(max_batch=32))
            await plain.load()
            await batched.load()
            for clients in (1, 32):
                for name, rt in (("plain", plain), ("batched", batched)):
                    key = f"{name}_{mode}_c{clients}"
                    samples.setdefault(key, []).append(await drive(rt, x, clients, seconds))
            await batched.unload()
            await plain.unload()
    batcher_module.INLINE_BELOW_US = INLINE_BELOW_US
    return {
        k: {"median": round(statistics.median(v)), "range": [round(min(v)), round(max(v))]}
        for k, v in sorted(samples.items())
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batcher", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    p.add_argument("--seconds", type=float, default=1.5, help="per measurement (default 1.5)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fogline-bench-batcher-") as tmp:
        model = digits(Path(tmp), Signer.generate())
        result = asyncio.run(
            measure(model.package, model.example["input"], args.rounds, args.seconds)
        )
    for key, v in result.items():
        print(f"{key:<24} {v['median']:>8} req/s  (range {v['range'][0]}–{v['range'][1]})")
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d", time.gmtime()), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
