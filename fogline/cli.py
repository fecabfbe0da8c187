"""The ``fogline`` command. Each group's modules are imported only when present,
so an edge device without torch still gets ``fogline edge run``; a command that needs
the cloud extra says so in ``--help`` and, when run, in one line.

Exit codes: 0 done, 1 an error, 2 a usage error; a closed stdout (``| head``) is quiet.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from fogline import __version__

# Libraries that only the cloud extra installs (``pip install 'fogline[cloud]'``).
CLOUD_ONLY = ("torch", "onnx", "sklearn", "amqtt", "rich", "psycopg")
CLOUD_GROUPS = ("demo", "model")  # need CLOUD_ONLY for their main work (train, compress, ...)
# Commands checked before they start anything (the demo would start a broker first).
NEEDS: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("demo", None): ("torch", "onnx", "sklearn"),
    ("model", "train"): ("torch", "onnx"),
    ("model", "compress"): ("onnx",),
    ("model", "package"): ("onnx",),
    ("model", "prune"): ("torch", "onnx"),
    ("model", "distill"): ("torch", "onnx"),
}
INSTALL_CLOUD = "pip install 'fogline[cloud]' (from a checkout: pip install '.[cloud]')"

# group -> (help, [(module, function registering its subcommands)])
GROUPS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "demo": (
        "run everything on this machine: broker, control plane, fallback, agents, "
        "a real model rolled out and served",
        [],
    ),
    "control": ("the control plane", [("cloud.control_cli", "register_control")]),
    "rollout": (
        "staged, gated rollouts: create, watch, pause, resume, abort, roll back",
        [("cloud.rollout_cli", "register")],
    ),
    "audit": ("who created, paused, resumed, aborted or rolled back what, and why", []),
    "fallback": ("the cloud fallback inference server", [("cloud.fallback", "register_cli")]),
    "edge": ("the edge agent", [("edge.cli", "register")]),
    "model": (
        "train, compress, package, sign, publish and roll out models",
        [
            ("cloud.pipeline.cli", "register"),
            ("cloud.control_cli", "register_operator"),
            ("cloud.registry_cli", "register"),
            ("cloud.pipeline.derive_cli", "register"),
            ("cloud.keys_cli", "register_model_sign"),
            ("cloud.device_cli", "register"),
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless the help already names it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        flag = action.nargs == 0  # store_true / store_const: its "default" is no news
        if flag or "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every (sub)parser of ``fogline`` shows defaults in ``--help``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def missing_cloud_libraries(names: Sequence[str] = CLOUD_ONLY) -> list[str]:
    """Those of ``names`` this Python cannot import (looked up without importing them)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


GLOBAL_VALUE_OPTIONS = ("--log-level",)  # the global options that take a value


def _takes_value(word: str) -> bool:
    """``--log-level`` or an abbreviation argparse accepts (``--log``), without ``=VALUE``."""
    return (
        len(word) > 2 and "=" not in word and any(o.startswith(word) for o in GLOBAL_VALUE_OPTIONS)
    )


def named_group(argv: Sequence[str]) -> str | None:
    """The command group ``argv`` names (its first word past the global options), if any."""
    words = iter(argv)
    for word in words:
        if _takes_value(word):
            next(words, None)  # its value
        elif not word.startswith("-"):
            return word if word in GROUPS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command tree; or, given ``argv``, every group listed but only the group
    it names given its subcommands. Each group imports its own modules (aiohttp, ONNX
    Runtime, the registry, ...): building all of them cost every command, an agent's
    start included, about a second of CPU before it did anything."""
    only = named_group(argv) if argv is not None else None
    if argv is not None and only is None and any(word in GROUPS for word in argv):
        argv = None  # a form the scan does not know: build every group, as argparse expects
    parser = Parser(
        prog="fogline",
        description="Fogline: an edge-and-cloud hybrid inference runtime.",
        epilog="Client commands read FOGLINE_CONTROL (control plane URL) and FOGLINE_TOKEN "
        "(operator token) from the environment.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the messages on stderr",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="export OpenTelemetry traces of inference requests (agent, fallback; needs "
        "fogline[otel]); also on when OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP_ENDPOINT is set",
    )
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    no_cloud = bool(missing_cloud_libraries())
    for name, (help_text, registrars) in GROUPS.items():
        if no_cloud and name in CLOUD_GROUPS:
            help_text += " [needs the cloud extra]"
        group = groups.add_parser(name, help=help_text, description=help_text)
        if argv is not None and name != only:
            continue  # listed in ``fogline --help``; built when a command names it
        if name == "demo":
            from fogline.demo import register

            register(group)
            continue
        if name == "audit":
            from cloud.rollout_cli import register_audit

            register_audit(group)
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


def _quiet_closed_stdout() -> int:
    """``fogline ... | head``: the reader left. As the Python docs advise (signal module,
    "Note on SIGPIPE"), point stdout at devnull so the exit flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


def _needs_cloud(exc: ModuleNotFoundError) -> bool:
    return (exc.name or "").partition(".")[0] in CLOUD_ONLY


def _needs_cloud_message(command: str, library: str) -> str:
    return f"error: {command} needs {library!r}, from the cloud extra: {INSTALL_CLOUD}"


def _start_tracing(flag: bool, group: str) -> bool:
    """Tracing on if asked; False (after one error line) if ``--trace`` cannot be honoured.

    Asked for by the environment only, a missing extra is a warning: a fleet-wide
    OTEL_* setting must not stop an agent that has no SDK.
    """
    from common import tracing  # light: opentelemetry is imported only by setup

    if not tracing.wanted(flag, os.environ):
        return True
    try:
        tracing.setup(f"fogline-{group}", os.environ)
    except tracing.MissingExtraError as exc:
        if flag:
            print(f"error: --trace: {exc}", file=sys.stderr)
            return False
        logging.getLogger(__name__).warning("OTEL_* set, but not tracing: %s", exc)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sub = getattr(args, "command", None)
    command = " ".join(filter(None, ("fogline", args.group, sub)))
    missing = missing_cloud_libraries(NEEDS.get((args.group, sub), ()))
    if missing:
        print(_needs_cloud_message(command, missing[0]), file=sys.stderr)
        return 1
    if not _start_tracing(args.trace, args.group):
        return 1
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _quiet_closed_stdout()
    except ModuleNotFoundError as exc:
        if not _needs_cloud(exc):
            raise
        print(_needs_cloud_message(command, str(exc.name)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
