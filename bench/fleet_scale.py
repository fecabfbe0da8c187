"""One control plane, a thousand simulated agents: its CPU, its API, a reconnect storm.

``python -m bench.fleet_scale [--json] [--agents 1000] [--heartbeat-s 10] [--window 60]``

A real Mosquitto and a real control plane (``fogline control serve``, its own
process, so its CPU is its own) serve ``--agents`` simulated devices
(`bench.simulate`: real MQTT sessions, outboxes, verification) heartbeating
every ``--heartbeat-s``. Over ``--window`` seconds the benchmark reads the
control plane's CPU time from ``/proc`` and times its API (``/api/health``
and ``/api/devices``, which lists every device) every half second. Then the
broker is killed and started again on the same port: a reconnect storm. The
devices come back with jittered backoff (`common.mqtt`); the figure is how
long until the control plane sees every device online again, and the API's
latency meanwhile.

Headline keys: ``control_cpu_pct_of_one_core``, ``api_p99_ms``,
``storm_converged_s``, ``lost``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.simulate import Fleet, FleetSpec
from fogline.broker import BrokerProcess, free_port, start_broker

logger = logging.getLogger("bench.fleet_scale")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _fogline(*args: str) -> list[str]:
    return [sys.executable, "-m", "fogline", *args]


def start_control(workdir: Path, broker_port: int) -> tuple[subprocess.Popen[bytes], str, str]:
    """The control plane as its own process; returns it, its URL and a viewer token."""
    create = ("control", "token", "create", "bench", "--role", "viewer", "--workdir", str(workdir))
    token = subprocess.run(
        _fogline(*create),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    port = free_port()
    log = (workdir / "control.log").open("ab")
    proc = subprocess.Popen(
        _fogline(
            *("control", "serve", "--workdir", str(workdir), "--port", str(port)),
            *("--broker-port", str(broker_port)),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}", token


async def _online(session: aiohttp.ClientSession, url: str, prefix: str, since: float = 0.0) -> int:
    """Devices the control plane shows online with a status published after ``since``."""
    async with session.get(f"{url}/api/devices") as resp:
        doc = await resp.json()
    return sum(
        1
        for d in doc["devices"]
        if d["device_id"].startswith(prefix)
        and d.get("state") == "online"
        and float(d.get("ts") or 0) > since
    )


async def wait_online(session, url, prefix, n, timeout, since=0.0) -> float:  # type: ignore[no-untyped-def]
    """Seconds until ``n`` devices show online with a status newer than ``since``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if await _online(session, url, prefix, since) >= n:
                return time.monotonic() - start
        except (aiohttp.ClientError, ValueError):
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"not all {n} devices online after {timeout:.0f} s")


async def probe_api(session, url, seconds) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    """Latency (ms) of each route, called in turn every half second for ``seconds``."""
    out: dict[str, list[float]] = {"/api/health": [], "/api/devices": []}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for route, samples in out.items():
            start = time.perf_counter()
            try:
                async with session.get(url + route) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                continue
            samples.append((time.perf_counter() - start) * 1000)
        await asyncio.sleep(0.5)
    return out


def _p(samples: list[float], q: int) -> float | None:
    if not samples:
        return None
    return round(statistics.quantiles(samples, n=100)[q - 1] if len(samples) > 1 else samples[0], 2)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prefix = "scale"
    with tempfile.TemporaryDirectory(prefix="fogline-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        broker: BrokerProcess = start_broker("mosquitto", workdir=tmp / "broker")
        control, url, token = start_control(tmp / "control", broker.port)
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with aiohttp.ClientSession(headers=headers) as session:
                await wait_online(session, url, "none", 0, 60)  # the API is up
                keys = await (await session.get(f"{url}/api/keys")).json()
                trust = tuple(k["public_key"] for k in keys["keys"])
                spec = FleetSpec(
                    "127.0.0.1",
                    broker.port,
                    trust,
                    str(tmp / "fleet"),
                    prefix=prefix,
                    heartbeat_s=args.heartbeat_s,
                    ramp_s=args.ramp_s,
                )
                with Fleet(spec, args.agents, args.processes):
                    joined = await wait_online(session, url, prefix, args.agents, 300)
                    logger.info("%d devices online, %.1f s after connecting", args.agents, joined)
                    cpu0, t0 = cpu_seconds(control.pid), time.monotonic()
                    steady = await probe_api(session, url, args.window)
                    cpu = (cpu_seconds(control.pid) - cpu0) / (time.monotonic() - t0)
                    logger.info(
                        "steady: control plane at %.1f%% of one core, API p99 %s ms (%s)",
                        100 * cpu,
                        _p(steady["/api/health"] + steady["/api/devices"], 99),
                        {r: _p(v, 99) for r, v in steady.items()},
                    )
                    # The storm: every device loses the broker at once, and on its return
                    # reconnects and publishes a new status (so a fresh `ts`).
                    broker.stop()
                    broker = start_broker("mosquitto", port=broker.port, workdir=tmp / "broker")
                    restarted = time.time()
                    storm_probe = asyncio.create_task(probe_api(session, url, 20))
                    try:
                        converged: float | None = await wait_online(
                            session, url, prefix, args.agents, 300, since=restarted
                        )
                    except TimeoutError as exc:  # reported as devices lost, not a crash
                        logger.warning("reconnect storm: %s", exc)
                        converged = None
                    storm = await storm_probe
                    online = await _online(session, url, prefix, since=restarted)
        finally:
            control.terminate()
            control.wait(30)
            broker.stop()
    all_steady = steady["/api/health"] + steady["/api/devices"]
    return {
        "agents": args.agents,
        "heartbeat_s": args.heartbeat_s,
        "control_cpu_pct_of_one_core": round(100 * cpu, 1),
        "api_p50_ms": _p(all_steady, 50),
        "api_p99_ms": _p(all_steady, 99),
        "api_p99_ms_by_route": {r: _p(s, 99) for r, s in steady.items()},
        "storm_converged_s": round(converged, 1) if converged is not None else None,
        "storm_api_p99_ms": _p(storm["/api/health"] + storm["/api/devices"], 99),
        "lost": args.agents - online,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet_scale",
        description="A control plane under a simulated fleet: CPU, API latency, reconnect storm.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--agents", type=int, default=1000, help="simulated devices")
    parser.add_argument("--heartbeat-s", type=float, default=10.0, help="telemetry interval")
    parser.add_argument("--ramp-s", type=float, default=30.0, help="spread first connects")
    parser.add_argument("--window", type=float, default=60.0, help="steady-state seconds")
    parser.add_argument("--processes", type=int, default=4, help="processes for the devices")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    result = asyncio.run(run(args))
    print(json.dumps(result) if args.json else result)
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
