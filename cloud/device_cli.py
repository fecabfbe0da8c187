"""``fogline model set-policy`` and ``fogline model remove``: per-device model commands.

Both go through the control plane (``cloud.device_api``), which signs one command per
device; the devices report ``policy_set`` / ``removed`` or ``failed`` as events.
"""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from cloud.cli_output import add_output_args, render, table
from cloud.control_cli import api_command, client_args
from cloud.control_client import ControlApi
from common.names import check_name
from common.policy import parse_policy


def register(subparsers: argparse._SubParsersAction) -> None:
    sp = subparsers.add_parser(
        "set-policy",
        help="change a served model's thresholds, latency budget and limits on devices",
        description="Send a signed set-policy command for MODEL to each device (--device, "
        "repeatable; default: every online device). Only the given fields change; devices "
        "keep the policy across restarts. Refused before anything is sent: NaN, negative "
        "values, a threshold above 1, an unknown device.",
    )
    sp.add_argument("model", metavar="MODEL", help="model name as the devices serve it")
    sp.add_argument("--device", action="append", help="target device (default: all online)")
    sp.add_argument(
        "--uncertainty-threshold",
        type=float,
        help="escalate a local answer whose uncertainty score is above this (0..1)",
    )
    sp.add_argument(
        "--latency-budget-ms",
        type=float,
        help="expected local queue wait above which requests go to the cloud (reason load)",
    )
    sp.add_argument(
        "--max-local-batch", type=int, help="requests with more rows go to the cloud (heavy)"
    )
    client_args(sp)
    add_output_args(sp)
    sp.set_defaults(func=api_command(_set_policy))
    rm = subparsers.add_parser(
        "remove",
        help="stop serving a model on a device and delete its slots",
        description="Send a signed remove command for MODEL to DEVICE; its other models "
        "keep serving. The device's configured model stays served by the cloud.",
    )
    rm.add_argument("model", metavar="MODEL", help="model name")
    rm.add_argument("--device", required=True, help="the device to remove it from")
    client_args(rm)
    add_output_args(rm)
    rm.set_defaults(func=api_command(_remove))


def _commands_table(doc: dict[str, Any]) -> str:
    rows = [[device, command] for device, command in sorted(doc["commands"].items())]
    return table(rows, ["DEVICE", "COMMAND"])


async def _set_policy(args: argparse.Namespace, api: ControlApi) -> int:
    model = check_name(args.model, "model name")
    fields = {
        "uncertainty_threshold": args.uncertainty_threshold,
        "latency_budget_ms": args.latency_budget_ms,
        "max_local_batch": args.max_local_batch,
    }
    policy = parse_policy({k: v for k, v in fields.items() if v is not None})
    body: dict[str, Any] = {"policy": policy.to_dict()}
    if args.device and len(args.device) == 1:
        device = check_name(args.device[0], "device id")
        path = f"/api/devices/{quote(device, safe='')}/policy"
        doc = await api.post_json(path, {**body, "model": model})
    else:
        if args.device:
            body["devices"] = [check_name(d, "device id") for d in args.device]
        doc = await api.post_json(f"/api/models/{quote(model, safe='')}/policy", body)
    print(render(doc, args.output, _commands_table))
    return 0


async def _remove(args: argparse.Namespace, api: ControlApi) -> int:
    model = check_name(args.model, "model name")
    device = check_name(args.device, "device id")
    doc = await api.request("DELETE", f"/api/devices/{quote(device)}/models/{quote(model)}")
    print(render(doc, args.output, _commands_table))
    return 0
