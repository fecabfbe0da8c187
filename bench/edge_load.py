"""Latency and throughput of one model, in process and through an agent, measured alike.

Every function takes the same feeds (one dict of input tensors per request,
batch 1) so that a path's figure and its in-process baseline differ only in
what sits between the client and ``session.run``.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import numpy as np

from common.inference import ROUTE, InferRequest, Tensor, request_to_rest

Feeds = dict[str, np.ndarray]


def rest_bodies(model: str, feeds: list[Feeds]) -> list[dict[str, Any]]:
    """V2 JSON bodies of ``feeds``, pinned to the local model (no cloud escalation)."""
    return [
        request_to_rest(
            InferRequest(model, [Tensor(k, v) for k, v in f.items()], parameters={ROUTE: "local"})
        )
        for f in feeds
    ]


def local_latency_us(session: Any, feeds: list[Feeds]) -> list[float]:
    out = []
    for f in feeds:
        start = time.perf_counter_ns()
        session.run(None, f)
        out.append((time.perf_counter_ns() - start) / 1000.0)
    return out


async def agent_latency_us(
    http: aiohttp.ClientSession, url: str, bodies: list[dict[str, Any]]
) -> list[float]:
    out = []
    for body in bodies:
        start = time.perf_counter_ns()
        async with http.post(url, json=body) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url} answered {resp.status}")
        out.append((time.perf_counter_ns() - start) / 1000.0)
    return out


async def interleaved_p50_us(
    session: Any, urls: dict[str, str], model: str, feeds: list[Feeds], rounds: int
) -> dict[str, float]:
    """Median µs per request of ``session.run`` ("raw") and of each URL, one connection,
    the paths taking turns round after round so that drift hits all alike."""
    bodies = rest_bodies(model, feeds)
    samples: dict[str, list[float]] = {"raw": [], **{k: [] for k in urls}}
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        local_latency_us(session, feeds[:20])  # warm-up every path
        for url in urls.values():
            await agent_latency_us(http, url, bodies[:20])
        for _ in range(rounds):
            samples["raw"] += local_latency_us(session, feeds)
            for name, url in urls.items():
                samples[name] += await agent_latency_us(http, url, bodies)
    return {k: statistics.median(v) for k, v in samples.items()}


def local_throughput(session: Any, feeds: list[Feeds], clients: int, requests: int) -> float:
    """Requests/s of ``clients`` threads sharing the session (ONNX Runtime releases the GIL)."""
    lock = threading.Lock()
    taken = [0]

    def worker() -> None:
        while True:
            with lock:
                i = taken[0]
                taken[0] += 1
            if i >= requests:
                return
            session.run(None, feeds[i % len(feeds)])

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    return requests / (time.perf_counter() - start)


async def agent_throughput(
    http: aiohttp.ClientSession, url: str, bodies: list[dict[str, Any]], clients: int, requests: int
) -> float:
    """Requests/s of ``clients`` concurrent connections, each sending one request at a time."""
    taken = [0]

    async def worker() -> None:
        while taken[0] < requests:
            i = taken[0]
            taken[0] += 1
            async with http.post(url, json=bodies[i % len(bodies)]) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return requests / (time.perf_counter() - start)


async def interleaved_throughput(
    session: Any, url: str, model: str, feeds: list[Feeds], clients: int, requests: int, rounds: int
) -> dict[str, float]:
    """Median req/s of the session in process and of the agent, same batch (1) and
    concurrency, taking turns; ``ratio`` is the median of the per-round ratios."""
    bodies = rest_bodies(model, feeds)
    local: list[float] = []
    agent: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
        await agent_throughput(http, url, bodies, clients, max(clients * 4, requests // 10))
        for _ in range(rounds):
            local.append(local_throughput(session, feeds, clients, requests))
            agent.append(await agent_throughput(http, url, bodies, clients, requests))
    ratios = [a / b for a, b in zip(agent, local, strict=True)]
    return {
        "local_rps": statistics.median(local),
        "agent_rps": statistics.median(agent),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
