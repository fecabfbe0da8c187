"""The fallback's operational figures for the README, on real processes.

1. Following: a real control plane, a real ``fogline fallback serve --control``
   process polling every 0.5 s under steady traffic; five versions published
   over HTTP; how long from the publish call returning to the first answer by
   the new version, and how many requests failed.
2. Drain: two replicas behind the retrying round-robin client of the tests,
   each restarted twice (SIGTERM, start again); requests answered, retried on
   the other replica, failed; and how long SIGTERM to exit took.

Run from the repo root: ``python scripts/fallback_figures.py`` (needs mosquitto).
Not a benchmark (no ratio): behaviour figures, with their spread.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.signing import Signer
from tests.cloud.test_fallback_drain import RoundRobin
from tests.cloud.test_fallback_follow import Traffic, publish
from tests.conftest import Mosquitto
from tests.edge.agent_harness import ControlPlane
from tests.model_fixtures import make_package
from tests.server_processes import start_fallback_with


async def following(tmp: Path, broker: Mosquitto) -> str:
    async with ControlPlane(tmp / "control", broker) as cp:
        await publish(cp, tmp, "1")
        flags = ["--control", cp.url, "--trust-key", cp.signer.public_key_hex, "--poll-s", "0.5"]
        flags += ["--cache-dir", str(tmp / "cache")]
        env = {"FOGLINE_FALLBACK_CONTROL_TOKEN": cp.tokens["viewer"]}
        server = await asyncio.to_thread(start_fallback_with, tmp, *flags, env=env)
        waits = []
        try:
            with Traffic(server.url) as traffic:
                while not traffic.answers:
                    await asyncio.sleep(0.05)
                for version in range(2, 7):
                    await publish(cp, tmp, str(version))
                    start = time.monotonic()
                    while traffic.answers[-1][1] != str(version):
                        await asyncio.sleep(0.01)
                    waits.append(time.monotonic() - start)
                    await asyncio.sleep(0.5)
        finally:
            server.stop()
        failed = sum(1 for status, _ in traffic.answers if status != 200)
        return (
            f"following (--poll-s 0.5, 5 versions published over HTTP, 1 client thread): "
            f"publish to first answer by the new version median {statistics.median(waits):.2f} s, "
            f"max {max(waits):.2f} s; {len(traffic.answers)} requests, {failed} failed"
        )


def draining(tmp: Path) -> str:
    pkg = make_package(tmp / "pkg", variant="cloud", signer=Signer.generate())
    flags = ["--package", str(pkg.directory), "--trust-key", pkg.signer.public_key_hex]
    replicas = [start_fallback_with(tmp, *flags) for _ in range(2)]
    ports = [int(r.url.rsplit(":", 1)[1]) for r in replicas]
    client = RoundRobin(ports)
    threads = [threading.Thread(target=client.run, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    stops = []
    try:
        for i, port in enumerate(ports * 2):
            i %= 2
            start = time.monotonic()
            replicas[i].stop()
            stops.append(time.monotonic() - start)
            assert replicas[i].proc.returncode == 0, replicas[i].log.read_text()
            replicas[i] = start_fallback_with(tmp, *flags, port=port)
    finally:
        client.stop.set()
        for t in threads:
            t.join(60)
        for r in replicas:
            r.stop()
    return (
        f"drain (2 replicas, each restarted twice, 4 client threads): {client.ok} answered, "
        f"{client.retried} retried on the other replica, {len(client.failures)} failed; "
        f"SIGTERM to exit max {max(stops):.2f} s"
    )


async def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Mosquitto(tmp)
        broker.start()
        try:
            print(await following(tmp, broker))
        finally:
            broker.stop()
        print(await asyncio.to_thread(draining, tmp))


if __name__ == "__main__":
    asyncio.run(main())
