"""``fogline rollout create|list|status|pause|resume|abort|rollback`` and ``fogline audit``.

Staged, gated rollouts on a running control plane (``cloud.staged_api``), through
``ControlApi`` with ``--control``/``$FOGLINE_CONTROL`` and ``--token``/``$FOGLINE_TOKEN``.
``--watch`` exits 0 when the rollout finished healthy, 1 when it failed, halted, was
aborted or rolled back, and 3 when ``--timeout`` passed first.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from cloud.cli_output import add_output_args, render, table
from cloud.control_cli import api_command, client_args
from cloud.control_client import ControlApi
from cloud.rollout_plan import Gates, parse_duration, parse_stages
from common.names import check_name

EXIT_TIMEOUT = 3
BASE = "/api/staged-rollouts"


def register(subparsers: argparse._SubParsersAction) -> None:
    create = _parser(subparsers, "create", "start a staged, gated rollout of MODEL VERSION")
    create.add_argument("model", metavar="MODEL")
    create.add_argument("version", metavar="VERSION")
    create.add_argument(
        "--to",
        default="all",
        help="'all' (online devices), device ids (a,b) or labels every target carries "
        "(site=berlin,arch=aarch64, set at enrollment)",
    )
    create.add_argument(
        "--stages", default="5%,25%,100%", help="cumulative share of targets per stage"
    )
    create.add_argument("--soak", default="10m", help="wait after each stage before its gates")
    gates = Gates()
    create.add_argument(
        "--max-failure-rate",
        type=float,
        default=gates.max_failure_rate,
        help="install failures per stage, and the error rate's increase over the previous version",
    )
    create.add_argument(
        "--max-escalation-increase",
        type=float,
        default=gates.max_escalation_increase,
        help="escalation rate, new version minus previous (absolute)",
    )
    create.add_argument(
        "--max-latency-increase",
        type=float,
        default=gates.max_latency_increase,
        help="local p95 latency increase over the previous version (0.2 = +20%%)",
    )
    create.add_argument(
        "--min-latency-increase-ms",
        type=float,
        default=gates.min_latency_increase_ms,
        help="a latency breach must also add at least this many ms to the p95 (tiny models' "
        "p95s swing by more than 20%% on a busy host)",
    )
    create.add_argument("--reason", help="why, for the audit log")
    _watch_args(create)
    create.set_defaults(func=_create)

    listing = _parser(subparsers, "list", "list staged rollouts, newest first")
    listing.set_defaults(func=_list)

    status = _parser(subparsers, "status", "one staged rollout: stages, gates, each device")
    status.add_argument("rollout_id", metavar="ID")
    _watch_args(status)
    status.set_defaults(func=_status)

    for action, text in (
        ("pause", "pause before the next step (a soak's clock stops)"),
        ("resume", "resume a paused rollout"),
        ("abort", "stop: no further stage; devices keep what they run"),
        ("rollback", "deploy each updated device's previous version again"),
    ):
        p = _parser(subparsers, action, text)
        p.add_argument("rollout_id", metavar="ID")
        p.add_argument("--reason", help="why, for the audit log")
        p.set_defaults(func=_action, action=action)


def register_audit(parser: argparse.ArgumentParser) -> None:
    """``fogline audit``: who created, paused, resumed, aborted or rolled back what, why."""
    client_args(parser)
    add_output_args(parser)
    parser.add_argument("--limit", type=int, default=100, help="newest entries to show")
    parser.set_defaults(func=_audit)


def _parser(
    subparsers: argparse._SubParsersAction, name: str, text: str
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(name, help=text, description=text + ".")
    client_args(p)
    add_output_args(p)
    return p


def _watch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--watch", action="store_true", help="follow until it ends (exit 0 healthy, 1 not)"
    )
    p.add_argument("--timeout", default="1h", help="with --watch: give up after this long (exit 3)")


@api_command
async def _create(args: argparse.Namespace, api: ControlApi) -> int:
    # Checked here too, so a typo is one line before any call.
    parse_stages(args.stages)
    parse_duration(args.soak)
    timeout = parse_duration(args.timeout, "--timeout")
    doc: dict[str, Any] = {
        "model": check_name(args.model, "model name"),
        "version": check_name(args.version, "model version"),
        "to": args.to,
        "stages": args.stages,
        "soak": args.soak,
        "max_failure_rate": args.max_failure_rate,
        "max_escalation_increase": args.max_escalation_increase,
        "max_latency_increase": args.max_latency_increase,
        "min_latency_increase_ms": args.min_latency_increase_ms,
    }
    if args.reason is not None:
        doc["reason"] = args.reason
    created = await api.post_json(BASE, doc)
    if not args.watch:
        print(render(created, args.output, _rollout_table))
        return 0
    return await _follow(api, created["id"], timeout, args.output)


@api_command
async def _list(args: argparse.Namespace, api: ControlApi) -> int:
    doc = await api.get(BASE)
    print(render(doc, args.output, lambda d: table([_row(r) for r in d["rollouts"]], HEADER)))
    return 0


@api_command
async def _status(args: argparse.Namespace, api: ControlApi) -> int:
    rollout_id = check_name(args.rollout_id, "rollout id")
    if args.watch:
        return await _follow(
            api, rollout_id, parse_duration(args.timeout, "--timeout"), args.output
        )
    print(render(await api.get(f"{BASE}/{rollout_id}"), args.output, _rollout_table))
    return 0


@api_command
async def _action(args: argparse.Namespace, api: ControlApi) -> int:
    rollout_id = check_name(args.rollout_id, "rollout id")
    body = {"reason": args.reason} if args.reason is not None else {}
    doc = await api.post_json(f"{BASE}/{rollout_id}/{args.action}", body)
    print(render(doc, args.output, _rollout_table))
    return 0


@api_command
async def _audit(args: argparse.Namespace, api: ControlApi) -> int:
    doc = await api.get(f"/api/audit?limit={int(args.limit)}")
    header = ["TIME", "WHO", "ACTION", "TARGET", "REASON"]
    rows = [
        [_when(e["ts"]), e["actor"], e["action"], e["target"], e["reason"]] for e in doc["entries"]
    ]
    print(render(doc, args.output, lambda _: table(rows, header)))
    return 0


async def _follow(api: ControlApi, rollout_id: str, timeout: float, fmt: str) -> int:
    """Poll until the rollout finishes (0 healthy, 1 not) or ``timeout`` passes (3)."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        doc = await api.get(f"{BASE}/{rollout_id}")
        line = _progress(doc)
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        if doc["finished"]:
            print(render(doc, fmt, _rollout_table))
            return 0 if doc["state"] == "succeeded" else 1
        if time.monotonic() >= deadline:
            print(render(doc, fmt, _rollout_table))
            print(f"error: rollout {rollout_id} not finished after {timeout:g}s", file=sys.stderr)
            return EXIT_TIMEOUT
        await asyncio.sleep(0.5)


def _progress(doc: dict[str, Any]) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(doc["counts"].items()))
    stages = len(doc["spec"]["stages"])
    return f"{doc['state']} ({doc['phase']}, stage {doc['stage'] + 1}/{stages}): {counts}"


HEADER = ["ID", "MODEL", "VERSION", "STATE", "PHASE", "STAGE", "BY", "DEVICES"]


def _row(r: dict[str, Any]) -> list[Any]:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
    stage = f"{r['stage'] + 1}/{len(r['spec']['stages'])}"
    return [
        r["id"],
        r["model"],
        r["version"],
        r["state"],
        r["phase"],
        stage,
        r["created_by"],
        counts,
    ]


def _rollout_table(r: dict[str, Any]) -> str:
    parts = [table([_row(r)], HEADER)]
    halt = r.get("halt_reason")
    if halt and "error" in halt:
        parts.append(f"halted at stage {halt['stage'] + 1}: {halt['metric']}: {halt['error']}")
    elif halt:
        parts.append(
            f"halted at stage {halt['stage'] + 1}: {halt['metric']} {_num(halt['value'])}"
            f" (previous version {_num(halt['baseline'])}, threshold {halt['threshold']:g})"
        )
    rows = [
        [
            d["device_id"],
            d["stage"] + 1,
            d["state"],
            d.get("package") or "-",
            d["previous_version"],
            d["reason"],
        ]
        for d in r["devices"]
    ]
    parts.append(table(rows, ["DEVICE", "STAGE", "STATE", "PACKAGE", "PREVIOUS", "REASON"]))
    return "\n\n".join(parts)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"
