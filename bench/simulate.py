"""A simulated fleet: hundreds to a thousand agents in a few processes.

``python -m bench.simulate N --broker-port P --trust-key HEX [--processes K]``

Each device is a `bench.sim_agent.SimAgent`: a real MQTT connection, real
signature, sequence and chunk verification, a real on-disk outbox, no ONNX
session. The devices are spread over K worker processes (one asyncio loop
each), connect over ``--ramp-s`` seconds (a fleet does not boot in one
instant), heartbeat every ``--heartbeat-s`` seconds, and obey signed deploy
commands from any control plane on the same broker until ``--duration`` ends
or Ctrl-C; then a summary is printed (``--json``: one JSON object).

`Fleet` is the same thing as a context manager, for `bench.rollout` and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.sim_agent import SimAgent
from common.signing import TrustStore

logger = logging.getLogger(__name__)
# NOTE: paho's network loop uses select(), which cannot watch a descriptor above 1023,
# and each simulated device holds about six (socket, paho's wake-up pair, the outbox's
# SQLite file, WAL and index): past ~170 per process, new connections fail silently.
MAX_DEVICES_PER_PROCESS = 150


@dataclass(frozen=True)
class FleetSpec:
    """What every worker needs to start its share of the fleet."""

    host: str
    port: int
    trusted_keys: tuple[str, ...]
    state_dir: str
    prefix: str = "sim"
    heartbeat_s: float = 10.0
    ramp_s: float = 5.0
    chunk_timeout_s: float = 3.0
    keep_artifact: bool = True  # False: verify every chunk, keep no bytes (big fleets)


def _worker(spec: FleetSpec, ids: list[str], ready: Any, stop: Any, results: Any) -> None:
    """One process: its agents on one event loop until ``stop`` is set."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(spec, ids, ready, stop, results))


async def _serve(spec: FleetSpec, ids: list[str], ready: Any, stop: Any, results: Any) -> None:
    agents = [
        SimAgent(
            device_id,
            host=spec.host,
            port=spec.port,
            trust=TrustStore(list(spec.trusted_keys)),
            state_dir=Path(spec.state_dir),
            heartbeat_s=spec.heartbeat_s,
            chunk_timeout_s=spec.chunk_timeout_s,
            keep_artifact=spec.keep_artifact,
        )
        for device_id in ids
    ]
    async with contextlib.AsyncExitStack() as stack:
        pause = spec.ramp_s / max(1, len(agents))
        for agent in agents:
            await stack.enter_async_context(agent)
            await asyncio.sleep(pause)
        for agent in agents:  # each one counted as it connects: the parent shows progress
            await agent.link.wait_connected(600)
            ready.put(1)
        while not stop.is_set():
            await asyncio.sleep(0.2)
        for agent in agents:  # what the broker has not taken yet is in the outbox
            await agent.outbox.flush(5)
        results.put({a.device_id: asdict(a.stats) for a in agents})


class Fleet:
    """``with Fleet(spec, n, processes) as fleet``: n simulated devices, all connected."""

    def __init__(self, spec: FleetSpec, n: int, processes: int = 2) -> None:
        self.spec, self.n = spec, n
        self.ids = [f"{spec.prefix}-{i:04d}" for i in range(n)]
        self.processes = max(1, min(n, max(processes, math.ceil(n / MAX_DEVICES_PER_PROCESS))))
        ctx = mp.get_context("spawn")  # NOTE: paho's threads and fork do not mix
        self._ready, self._results, self._stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(spec, self.ids[i :: self.processes], self._ready, self._stop, self._results),
                daemon=True,
            )
            for i in range(self.processes)
        ]
        self.stats: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> Fleet:
        for proc in self._procs:
            proc.start()
        connected, shown = 0, time.monotonic()
        # Generous: on a busy 2-core machine a thousand sessions take minutes to set up.
        deadline = time.monotonic() + 60 + self.spec.ramp_s + 0.5 * self.n
        while connected < self.n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not any(p.is_alive() for p in self._procs):
                self._terminate()
                raise RuntimeError(f"only {connected} of {self.n} simulated devices connected")
            with contextlib.suppress(Exception):
                connected += self._ready.get(timeout=min(1.0, remaining))
            if time.monotonic() - shown > 10:
                logger.info("%d of %d simulated devices connected", connected, self.n)
                shown = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for _ in self._procs:
            with contextlib.suppress(Exception):
                self.stats.update(self._results.get(timeout=60))
        self._terminate()

    def _terminate(self) -> None:
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]


def summary(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "devices": len(stats),
        "commands": sum(s["commands"] for s in stats.values()),
        "refused": sum(s["refused"] for s in stats.values()),
        "activated": sum(len(s["activated"]) for s in stats.values()),
        "failed": sum(s["failed"] for s in stats.values()),
        "chunks_rejected": sum(s["chunks_rejected"] for s in stats.values()),
        "bytes_received": sum(s["bytes_received"] for s in stats.values()),
    }


@contextlib.contextmanager
def _state_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fogline-sim-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.simulate",
        description="Run N simulated agents (real MQTT, signatures, chunks and outboxes; no "
        "ONNX sessions) against a broker and any control plane on it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("n", type=int, help="how many simulated devices")
    parser.add_argument("--broker-host", default="127.0.0.1", help="MQTT broker host")
    parser.add_argument("--broker-port", type=int, default=1883, help="MQTT broker port")
    parser.add_argument(
        "--trust-key",
        action="append",
        required=True,
        metavar="HEX",
        help="Ed25519 public key the devices trust (the control plane's; repeatable)",
    )
    parser.add_argument("--processes", type=int, default=4, help="worker processes")
    parser.add_argument("--heartbeat-s", type=float, default=10.0, help="telemetry interval")
    parser.add_argument("--ramp-s", type=float, default=10.0, help="spread connects over this")
    parser.add_argument("--duration", type=float, default=0, help="seconds to run (0: Ctrl-C)")
    parser.add_argument("--prefix", default="sim", help="device ids are PREFIX-0000, …")
    parser.add_argument("--state-dir", type=Path, help="outboxes here (default: a temp dir)")
    parser.add_argument(
        "--verify-only",
        action="store_true",
        help="check every chunk against the signed chunk list but keep no artifact bytes "
        "(and so skip the whole-artifact digest): for fleets too big to hold N copies",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= 10_000:
        parser.error("N must be in 1..10000")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    with _state_dir(args.state_dir) as state:
        spec = FleetSpec(
            args.broker_host,
            args.broker_port,
            tuple(args.trust_key),
            str(state),
            prefix=args.prefix,
            heartbeat_s=args.heartbeat_s,
            ramp_s=args.ramp_s,
            keep_artifact=not args.verify_only,
        )
        started = time.monotonic()
        fleet = Fleet(spec, args.n, args.processes)
        try:
            with fleet:
                logger.info(
                    "%d simulated devices connected in %.1f s (Ctrl-C stops)",
                    args.n,
                    time.monotonic() - started,
                )
                end = time.monotonic() + args.duration if args.duration else float("inf")
                while time.monotonic() < end:
                    time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    result = summary(fleet.stats)
    print(json.dumps(result) if args.json else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
