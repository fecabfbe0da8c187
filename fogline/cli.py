"""The ``fogline`` command. Each group's modules are imported only when present,
so an edge device without torch still gets ``fogline edge run``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# group -> (help, [(module, function registering its subcommands)])
GROUPS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "demo": (
        "run everything on this machine: broker, control plane, fallback, agents, "
        "a real model rolled out and served",
        [],
    ),
    "control": ("the control plane", [("cloud.control_cli", "register_control")]),
    "fallback": ("the cloud fallback inference server", [("cloud.fallback", "register_cli")]),
    "edge": ("the edge agent", [("edge.cli", "register")]),
    "model": (
        "train, compress, package, sign, publish and roll out models",
        [
            ("cloud.pipeline.cli", "register"),
            ("cloud.control_cli", "register_operator"),
            ("cloud.keys_cli", "register_model_sign"),
        ],
    ),
    "keys": (
        "the signing keys: create, rotate, revoke, list",
        [("cloud.keys_cli", "register")],
    ),
    "device": (
        "enroll devices: broker credentials, trusted keys and a fallback token",
        [("cloud.enrollment_cli", "register_device")],
    ),
    "broker": (
        "broker configuration with per-device credentials and an ACL",
        [("cloud.enrollment_cli", "register_broker")],
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fogline",
        description="Fogline: an edge-and-cloud hybrid inference runtime.",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for name, (help_text, registrars) in GROUPS.items():
        group = groups.add_parser(name, help=help_text, description=help_text)
        if name == "demo":
            from fogline.demo import register

            register(group)
            continue
        sub = group.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
        for module, function in registrars:
            try:
                getattr(importlib.import_module(module), function)(sub)
            except ImportError as exc:
                group.epilog = (
                    f"Some commands are unavailable: {exc}. "
                    "Install the matching extra, e.g. pip install 'fogline[cloud]'."
                )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)
