"""A closed-loop HTTP load generator, run in its own process so it never shares a GIL
with the server it measures.

``python -m bench.loadgen --url URL --body FILE --concurrency C --seconds S``
prints one JSON object: requests/s, p50/p99 in ms, and the count of non-200 answers.
Each of C clients sends the same batch-1 V2 JSON body, waits for the answer, and
sends again; answers that finish inside the measured window count, whenever they were
sent (as wrk counts), so a model whose batches take seconds is not read as zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np


async def _client(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    start: float,
    end: float,
    latencies: list[float],
    errors: dict[str, int],
) -> None:
    headers = {"Content-Type": "application/json"}
    while True:
        sent = time.perf_counter()
        if sent >= end:
            return
        try:
            async with http.post(url, data=body, headers=headers) as resp:
                await resp.read()
                status = str(resp.status)
        except aiohttp.ClientError as exc:
            status = type(exc).__name__
        done = time.perf_counter()
        if not start <= done <= end:  # warm-up, or past the window
            continue
        if status == "200":
            latencies.append(done - sent)
        else:
            errors[status] = errors.get(status, 0) + 1


async def load(
    url: str, body: bytes, concurrency: int, seconds: float, warmup: float
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = time.perf_counter() + warmup
        end = start + seconds
        await asyncio.gather(
            *(_client(http, url, body, start, end, latencies, errors) for _ in range(concurrency))
        )
    ms = np.asarray(latencies) * 1000.0
    return {
        "concurrency": concurrency,
        "requests_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "ok": len(latencies),
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="the V2 infer URL")
    p.add_argument("--body", type=Path, required=True, help="file holding the JSON body")
    p.add_argument("--concurrency", type=int, default=1, help="clients (default %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured (default %(default)s)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured (default %(default)s)")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.seconds <= 0 or args.warmup < 0:
        print("loadgen: error: concurrency >= 1, seconds > 0, warmup >= 0", file=sys.stderr)
        return 1
    result = asyncio.run(
        load(args.url, args.body.read_bytes(), args.concurrency, args.seconds, args.warmup)
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
