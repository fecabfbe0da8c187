"""A package to a simulated fleet, against the raw MQTT ceiling, side by side in one run.

``python -m bench.rollout [--json] [--size-mb 25] [--agents 1,10,50,100,300] [--processes 4]``

For each fleet size, in one run on one Mosquitto: (a) the raw ceiling — the
artifact's bytes, cut into the same chunks, published with plain paho-mqtt
(QoS 1) to as many plain subscribers spread over the same number of processes,
each doing the simulated agent's per-chunk verification (header, one SHA-256,
compared with the signed chunk list), timed until the last one has verified
every chunk; and (b) Fogline — the real control
plane (in this process) rolls the signed package out to as many simulated
agents (`bench.sim_agent`: real signature, sequence and per-chunk
verification against the signed chunk list, real outboxes; no bytes kept, so
no whole-artifact digest: 300 copies of 25 MB would not fit in memory),
timed from the rollout's start (signing the commands included) until the last
device has verified every chunk, the raw side's end point (``fogline_s``); also
until the last device marked itself ``activated`` (``fogline_activated_s``,
after one more durable outbox write) and the rollout's own record of its
duration at the control plane (``rollout_recorded_s``, until every device's
``activated`` event was stored).
A and B alternate (raw, fogline, raw) and the ratio uses the mean of the two
raw runs around each Fogline run, because this machine's speed drifts. Also
reported: a third raw run whose subscribers only count bytes (``raw_transport_s``,
``ratio_to_raw_transport``: the transport alone), the bytes the control plane
sent per artifact byte, and devices lost (never activated).

Headline keys: ``ratio_to_raw`` (by fleet size), ``bytes_sent_over_artifact_100``
(or the largest size run), ``lost``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from bench.simulate import Fleet, FleetSpec, summary
from cloud.control_server import REGISTRY, ROLLOUTS, ControlSettings, build_control_app
from cloud.keys_api import KEYS
from common import chunking
from common.manifest import Manifest, SignedManifest, TensorSpec, file_entry
from fogline.broker import free_port, start_broker

logger = logging.getLogger("bench.rollout")
RAW_TOPIC = "bench/raw/chunks"
_CHUNK_HEADER = struct.Struct(">4sIIQQ32s4x")  # common.chunking's 64-byte header


# -- the raw ceiling: plain paho, same bytes, same chunking ------------------------------


def _raw_worker(
    port: int, n: int, hashes: list[str] | None, count: int, total: int, ready: Any, done: Any
) -> None:
    """``n`` plain subscribers in this process; each reports when it has every chunk.

    With ``hashes`` (the signed chunk list), each subscriber does the simulated
    agent's per-chunk work: parse the header, SHA-256 the chunk once, compare with
    the signed hash, count distinct indices. Without, it only counts bytes (the
    transport alone).
    """
    signed = [bytes.fromhex(h) for h in hashes] if hashes is not None else None
    got = [0] * n
    have: list[set[int]] = [set() for _ in range(n)]
    finished = threading.Event()
    left = [n]
    lock = threading.Lock()
    clients = []

    def complete() -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.put(time.time())
                finished.set()

    for i in range(n):
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"raw-{os.getpid()}-{i}", clean_session=True
        )

        def on_message(_c: Any, _u: Any, msg: Any, i: int = i) -> None:
            if signed is None:
                got[i] += len(msg.payload)
                if got[i] == total:
                    complete()
                return
            # What chunking.decode and the Assembler do, written out (the ceiling must not
            # change with Fogline's code): the header, one SHA-256, the signed hash.
            payload = msg.payload
            magic, index, _count, _offset, _total, digest = _CHUNK_HEADER.unpack_from(payload)
            actual = hashlib.sha256(payload[_CHUNK_HEADER.size :]).digest()
            if magic != b"FGC1" or actual != digest or actual != signed[index]:
                return
            if index not in have[i]:
                have[i].add(index)
                if len(have[i]) == count:
                    complete()

        subscribed = threading.Event()
        client.on_message = on_message
        client.on_subscribe = lambda *_a, ev=subscribed: ev.set()
        client.connect("127.0.0.1", port)
        client.subscribe(RAW_TOPIC, qos=1)
        client.loop_start()
        subscribed.wait(30)
        clients.append(client)
    ready.put(n)
    finished.wait(600)
    for client in clients:
        client.disconnect()
        client.loop_stop()


def raw_ceiling(
    port: int, chunks: list[bytes], n: int, processes: int, hashes: list[str] | None = None
) -> float:
    """Seconds from the first publish until every subscriber has every chunk (verified
    against ``hashes`` when given, else just every byte)."""
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    total = sum(len(c) for c in chunks)
    shares = [len(range(i, n, processes)) for i in range(min(processes, n))]
    procs = [
        ctx.Process(
            target=_raw_worker,
            args=(port, k, hashes, len(chunks), total, ready, done),
            daemon=True,
        )
        for k in shares
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{os.getpid()}")
    publisher.max_inflight_messages_set(100)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    start = time.time()
    infos = [publisher.publish(RAW_TOPIC, chunk, qos=1) for chunk in chunks]
    for info in infos:
        info.wait_for_publish(120)
    ends = [done.get(timeout=600) for _ in procs]
    publisher.disconnect()
    publisher.loop_stop()
    for proc in procs:
        proc.join(30)
    return max(ends) - start


# -- Fogline: the real control plane, simulated agents ----------------------------------


def make_package(directory: Path, size: int) -> tuple[Path, Manifest]:
    """An unsigned package with a ``size``-byte model file (random: incompressible).

    The simulated agents never open it, so it need not be a real ONNX model.
    """
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / "model.onnx"
    model.write_bytes(os.urandom(size))
    manifest = Manifest(
        name="bulk",
        version="1",
        release=1,
        variant="edge",
        task="classification",
        format="onnx",
        precision="fp32",
        files=[file_entry(model, "model")],
        inputs=[TensorSpec("input", "FP32", [-1, 4])],
        outputs=[TensorSpec("probabilities", "FP32", [-1, 2])],
    )
    return directory, manifest


class ControlPlane:
    """The real control-plane app on a free port, in this process's event loop."""

    def __init__(self, workdir: Path, broker_port: int, chunk_size: int) -> None:
        self.settings = ControlSettings(
            workdir=workdir,
            port=free_port(),
            broker_port=broker_port,
            telemetry_interval_s=0,
            chunk_size=chunk_size,
        )

    async def __aenter__(self) -> ControlPlane:
        self.app = build_control_app(self.settings)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.settings.port).start()
        await self.app[ROLLOUTS].link.wait_connected(20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def fogline_rollout(cp: ControlPlane, devices: list[str]) -> tuple[float, dict[str, Any]]:
    """When the rollout started (wall clock), its final record and the bytes it sent."""
    rollouts = cp.app[ROLLOUTS]
    before = dict(rollouts.stats)
    start = time.time()
    rollout_id = await rollouts.start("bulk", "1", devices)
    registry = cp.app[REGISTRY]
    while (doc := await asyncio.to_thread(registry.rollout, rollout_id))["state"] == "running":
        await asyncio.sleep(0.05)
    sent = rollouts.stats["bytes_sent"] - before.get("bytes_sent", 0)
    return start, {"doc": doc, "bytes_sent": sent}


def _wait_online(registry: Any, devices: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        online = {d["device_id"] for d in registry.devices() if d.get("state") == "online"}
        if set(devices) <= online:
            return
        time.sleep(0.2)
    raise RuntimeError("simulated devices never showed up online at the control plane")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(x) for x in args.agents.split(",")]
    size = int(args.size_mb * 1024 * 1024)
    results: dict[str, Any] = {"size_bytes": size, "by_agents": {}}
    with tempfile.TemporaryDirectory(prefix="fogline-bench-rollout-") as tmp_name:
        tmp = Path(tmp_name)
        broker = start_broker("mosquitto", workdir=tmp / "broker")
        try:
            async with ControlPlane(tmp / "control", broker.port, args.chunk_kib * 1024) as cp:
                directory, manifest = make_package(tmp / "pkg", size)
                signer = cp.app[KEYS].signer
                record = await asyncio.to_thread(
                    cp.app[REGISTRY].publish, directory, manifest, signer
                )
                signed: SignedManifest = record.signed
                chunk_size = signed.manifest.chunks.size if signed.manifest.chunks else 0
                data = (directory / "model.onnx").read_bytes()
                chunks = [c.encode() for c in chunking.split(data, chunk_size)]
                logger.info(
                    "package: %.1f MB in %d chunks of %d KiB",
                    size / 2**20,
                    len(chunks),
                    chunk_size // 1024,
                )
                hashes = signed.manifest.chunks.sha256 if signed.manifest.chunks else None
                for n in sizes:
                    results["by_agents"][str(n)] = await _one_size(
                        args, cp, broker.port, signer.public_key_hex, record, chunks, hashes, n, tmp
                    )
        finally:
            broker.stop()
    by = results["by_agents"]
    largest = "100" if "100" in by else max(by, key=int)
    results["ratio_to_raw"] = {k: v["ratio_to_raw"] for k, v in by.items()}
    results["bytes_sent_over_artifact_100"] = by[largest]["bytes_sent_over_artifact"]
    results["bytes_sent_measured_at"] = int(largest)
    results["lost"] = sum(v["lost"] for v in by.values())
    return results


async def _one_size(args, cp, port, key, record, chunks, hashes, n, tmp) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    raw = functools.partial(raw_ceiling, port, chunks, n, args.processes)
    raw_before = await asyncio.to_thread(raw, hashes)
    spec = FleetSpec(
        "127.0.0.1",
        port,
        (key,),
        str(tmp / f"fleet-{n}"),
        prefix=f"sim{n}",
        ramp_s=min(5, n / 50),
        keep_artifact=False,  # 300 devices × 25 MB would not fit in memory
    )
    fleet = Fleet(spec, n, args.processes)
    with fleet:
        await asyncio.to_thread(_wait_online, cp.app[REGISTRY], fleet.ids)
        start, outcome = await fogline_rollout(cp, fleet.ids)
    raw_after = await asyncio.to_thread(raw, hashes)
    transport = await asyncio.to_thread(raw, None)  # for reference: bytes counted only
    stats = fleet.stats
    digest = record.artifact_digest
    activated = [s["activated"][digest] for s in stats.values() if digest in s["activated"]]
    verified = [s["verified"][digest] for s in stats.values() if digest in s["verified"]]
    lost = n - len(activated)
    # The raw ceiling's end point: every device has verified every chunk.
    seconds = (max(verified) - start) if activated else float("nan")
    raw_s = statistics.mean([raw_before, raw_after])
    row = {
        "fogline_s": round(seconds, 3),
        "fogline_activated_s": round(max(activated) - start, 3) if activated else None,
        "rollout_recorded_s": outcome["doc"]["seconds"],  # the control plane's own record
        "raw_s": [round(raw_before, 3), round(raw_after, 3)],
        "ratio_to_raw": round(seconds / raw_s, 2) if activated else None,
        "raw_transport_s": round(transport, 3),
        "ratio_to_raw_transport": round(seconds / transport, 2) if activated else None,
        "bytes_sent_over_artifact": round(outcome["bytes_sent"] / record.artifact_size, 3),
        "lost": lost,
        "rollout_state": outcome["doc"]["state"],
        "fleet": summary(stats),
    }
    logger.info(
        "%4d agents: fogline %.2f s, raw %.2f/%.2f s (transport only %.2f s), ratio %s,"
        " sent %.2f× the artifact, lost %d",
        n,
        seconds,
        raw_before,
        raw_after,
        transport,
        row["ratio_to_raw"],
        row["bytes_sent_over_artifact"],
        lost,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rollout",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size-mb", type=float, default=25.0, help="package size")
    parser.add_argument("--agents", default="1,10,50,100,300", help="fleet sizes, comma-separated")
    parser.add_argument("--processes", type=int, default=4, help="processes for the devices")
    parser.add_argument(
        "--chunk-kib",
        type=int,
        default=128,
        help="the control plane's chunk size (128 KiB stays under AWS IoT Core's payload "
        "limit; the raw ceiling uses the same chunks)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("cloud").setLevel(logging.WARNING)
    results = asyncio.run(run(args))
    if args.json:
        print(json.dumps(results))
    else:
        for n, row in results["by_agents"].items():
            print(n, {k: v for k, v in row.items() if k != "fleet"})
    return 0 if results["lost"] == 0 else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
