"""``fogline control serve`` and the operator commands that talk to it
(``fogline model publish``, ``fogline model rollout``, ``fogline control devices|models``).

Every client command talks through ``cloud.control_client.ControlApi`` to ``--control``
or ``$FOGLINE_CONTROL`` with an operator token (``--token`` or ``$FOGLINE_TOKEN``).
Exit codes: 0 done, 1 the call failed, 2 the operator's input is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cloud.cli_output import RolloutProgress, add_output_args, render, table
from cloud.control_client import (
    CONTROL_ENV,
    DEFAULT_CONTROL,
    TOKEN_ENV,
    ControlApi,
    ControlClient,
    ControlError,
)
from common.errors import FoglineError, InvalidInputError
from common.manifest import ACCURACY, MANIFEST_FILE, UNSIGNED_MANIFEST_FILE
from common.names import check_name

__all__ = ["DEFAULT_CONTROL", "TOKEN_ENV", "ControlClient", "ControlError", "client_from_args"]

logger = logging.getLogger(__name__)


def register_control(subparsers: argparse._SubParsersAction) -> None:
    from cloud.token_cli import register_token

    _register_serve(subparsers)
    register_token(subparsers)
    for name, help_text in (
        ("devices", "list the fleet: state, model, version, traffic"),
        ("models", "list published model versions"),
    ):
        p = subparsers.add_parser(name, help=help_text, description=help_text + ".")
        client_args(p)
        add_output_args(p)
        p.set_defaults(func=_list_devices if name == "devices" else _list_models)
    _register_rollout_views(subparsers)


def _register_rollout_views(subparsers: argparse._SubParsersAction) -> None:
    listing = subparsers.add_parser(
        "rollouts", help="list recent rollouts", description="The most recent rollouts."
    )
    client_args(listing)
    add_output_args(listing)
    listing.set_defaults(func=_list_rollouts)
    show = subparsers.add_parser(
        "rollout", help="show one rollout", description="One rollout and each device's stage."
    )
    show.add_argument("rollout_id", metavar="ID", help="rollout id (from `rollouts`)")
    client_args(show)
    add_output_args(show)
    show.set_defaults(func=_show_rollout)


def client_args(p: argparse.ArgumentParser) -> None:
    """``--control`` and ``--token``; both fall back to the environment."""
    p.add_argument(
        "--control",
        metavar="URL",
        help=f"control plane base URL (default: ${CONTROL_ENV}, else {DEFAULT_CONTROL})",
    )
    p.add_argument(
        "--token", help=f"operator token (default: ${TOKEN_ENV}); see `fogline control token`"
    )


def control_url(args: argparse.Namespace) -> str:
    """``--control``, else ``$FOGLINE_CONTROL``, else the default."""
    return str(args.control or os.environ.get(CONTROL_ENV) or DEFAULT_CONTROL)


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get(TOKEN_ENV)


def client_from_args(args: argparse.Namespace) -> ControlClient:
    """The synchronous client a command uses (``--control``/``--token`` or the environment)."""
    return ControlClient(control_url(args), token=_token(args))


ApiHandler = Callable[[argparse.Namespace, ControlApi], Awaitable[int]]


def exit_code(exc: BaseException) -> int:
    """2 for the operator's input (a bad URL, package or flag), 1 for a failed call."""
    return 2 if isinstance(exc, InvalidInputError) else 1


def api_command(handler: ApiHandler) -> Callable[[argparse.Namespace], int]:
    """Run an async handler with a ``ControlApi`` on one event loop; any error is one
    ``error:`` line on stderr and an exit code, never a traceback."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        async def main() -> int:
            async with ControlApi(control_url(args), token=_token(args)) as api:
                return await handler(args, api)

        try:
            return asyncio.run(main())
        except BrokenPipeError:
            raise  # stdout closed (`| head`): fogline.cli.main ends quietly
        except (FoglineError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exit_code(exc)

    return run


def _register_serve(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the control plane",
        description="Run the control plane: registry (SQLite), artifact store, signing key, "
        "rollouts over MQTT, operator REST API and dashboard.",
    )
    serve.add_argument(
        "--workdir",
        type=Path,
        default=Path("fogline-control"),
        help="state: control.sqlite, store/, keys/ (default: %(default)s)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--public-url",
        help="base URL agents use for HTTP artifact downloads (default: http://HOST:PORT)",
    )
    serve.add_argument(
        "--database",
        metavar="URL",
        help="postgresql://… for state shared by replicas (default: $FOGLINE_DATABASE_URL, "
        "which keeps the password off the command line, else WORKDIR/control.sqlite)",
    )
    serve.add_argument(
        "--require-offline-signature",
        action="store_true",
        help="accept only packages signed offline by a release key (fogline model sign), "
        "so that a stolen operator token alone cannot ship a model",
    )
    serve.add_argument("--broker-host", default="127.0.0.1", help="MQTT broker host")
    serve.add_argument("--broker-port", type=int, default=1883, help="MQTT broker port")
    serve.add_argument(
        "--broker-username",
        help="broker login (default: WORKDIR/broker-control.json, made by `fogline broker config`)",
    )
    serve.add_argument("--broker-password-file", type=Path, help="file holding the password")
    serve.add_argument(
        "--replica",
        type=int,
        default=os.environ.get("FOGLINE_REPLICA", "1"),
        metavar="K",
        help="which control-plane replica this is, to pick its own broker login from the "
        "workdir (`fogline broker config --control-replicas N` makes one per replica) "
        "(default: $FOGLINE_REPLICA, else %(default)s)",
    )
    serve.add_argument("--broker-tls-ca", help="CA file: connect to the broker with TLS")
    serve.add_argument(
        "--mqtt-client-id",
        metavar="NAME",
        help="stable MQTT client id: a persistent session that survives restarts; keep it "
        "secret or ACL-protected (default: a random id per process, clean session)",
    )
    serve.add_argument(
        "--share-group",
        metavar="NAME",
        help="replicas on one PostgreSQL name one group: the broker gives each device event "
        "to one of them ($share/NAME/...) (default: this process takes every event)",
    )
    serve.add_argument(
        "--max-upload-bytes",
        type=int,
        default=2 * 1024**3,
        help="largest package a publish may upload (default: %(default)s)",
    )
    serve.add_argument(
        "--chunk-size",
        type=int,
        default=32 * 1024,
        help="smallest artifact chunk size in bytes; big artifacts get bigger chunks "
        "(at most 1024 per artifact) (default: %(default)s)",
    )
    serve.add_argument(
        "--fallback-metrics",
        action="append",
        metavar="URL",
        help="a cloud fallback's base URL whose /metrics the dashboard's serving view shows "
        "(queue vs compute time, batch sizes); repeat for several (default: none)",
    )
    serve.set_defaults(func=_serve)


def register_operator(subparsers: argparse._SubParsersAction) -> None:
    pub = subparsers.add_parser(
        "publish",
        help="upload a package to the control plane, which signs and stores it",
        description="Upload a package directory made by `fogline model package` "
        f"({UNSIGNED_MANIFEST_FILE} + files). The control plane signs it, unless the "
        f"package was signed offline (`fogline model sign`: {MANIFEST_FILE}), which is "
        "then sent as it is.",
    )
    pub.add_argument("--package", type=Path, required=True, help="package directory")
    client_args(pub)
    pub.set_defaults(func=api_command(_publish))
    roll = subparsers.add_parser(
        "rollout",
        help="roll a published edge model out to devices over MQTT",
        description="Start a rollout and, with --wait, show its progress until it ends.",
    )
    roll.add_argument("--model", required=True, help="model name, e.g. digits")
    roll.add_argument("--version", required=True, help="published version to roll out")
    roll.add_argument("--device", action="append", help="target device (default: all online)")
    roll.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="roll out a lower release than devices run (needs an admin token)",
    )
    client_args(roll)
    roll.add_argument(
        "--wait",
        action="store_true",
        help="wait until it ends, with progress on stderr (a live line on a terminal), "
        "then print the final state as JSON on stdout",
    )
    roll.add_argument(
        "--timeout", type=float, default=300.0, help="with --wait: seconds to wait at most"
    )
    roll.set_defaults(func=api_command(_rollout))


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from cloud.control_server import ControlSettings, build_control_app

    try:
        username, password = _broker_login(args)
    except FoglineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    settings = ControlSettings(
        broker_username=username,
        broker_password=password,
        broker_tls_ca=args.broker_tls_ca,
        workdir=args.workdir,
        host=args.host,
        port=args.port,
        broker_host=args.broker_host,
        broker_port=args.broker_port,
        chunk_size=args.chunk_size,
        public_url=args.public_url,
        database=args.database or os.environ.get("FOGLINE_DATABASE_URL") or None,
        mqtt_client_id=args.mqtt_client_id,
        share_group=args.share_group,
        max_upload_bytes=args.max_upload_bytes,
        require_offline_signature=args.require_offline_signature,
        fallback_metrics_urls=tuple(args.fallback_metrics or ()),
    )
    logger.info("control plane on http://%s:%s (workdir %s)", args.host, args.port, args.workdir)
    try:
        web.run_app(
            build_control_app(settings), host=args.host, port=args.port, print=None, access_log=None
        )
    except FoglineError as exc:  # e.g. the keys are held by another control plane
        print(f"fogline control serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _broker_login(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """Flags first, else the login ``fogline broker config`` left in the workdir, else none.

    Also checks the TLS CA file, so that a typo is one line at start, not a failing
    reconnect loop.
    """
    from cloud.enrollment import control_login_name, read_control_credentials

    if args.broker_tls_ca and not Path(args.broker_tls_ca).is_file():
        raise InvalidInputError(f"--broker-tls-ca {args.broker_tls_ca} is not a file")
    if args.broker_username or args.broker_password_file:
        if not (args.broker_username and args.broker_password_file):
            raise InvalidInputError("--broker-username and --broker-password-file go together")
        try:
            password = args.broker_password_file.read_text().strip()
        except OSError as exc:
            raise InvalidInputError(f"cannot read {args.broker_password_file}: {exc}") from exc
        return args.broker_username, password
    _, filename = control_login_name(args.replica)
    path = args.workdir / filename
    if not path.exists():
        if args.replica != 1:
            raise InvalidInputError(
                f"no broker login for replica {args.replica} ({path}): run `fogline broker "
                f"config --control-replicas {args.replica}` and reload the broker"
            )
        return None, None
    creds = read_control_credentials(path)
    return creds.username, creds.password


# -- operator commands: data to stdout, progress and errors to stderr ---------------------


async def _publish(args: argparse.Namespace, api: ControlApi) -> int:
    record = await api.publish(args.package)
    print(json.dumps(record, indent=2))
    return 0


async def _list(
    args: argparse.Namespace, api: ControlApi, path: str, key: str, header: list[str], row: Any
) -> int:
    doc = await api.get(path)
    print(render(doc, args.output, lambda d: table([row(x) for x in d[key]], header)))
    return 0


def _device_row(d: dict[str, Any]) -> list[Any]:
    model = (d.get("models") or [{}])[0]
    totals = (d.get("telemetry") or {}).get("totals") or {}
    return [
        d["device_id"],
        d.get("state"),
        model.get("name"),
        model.get("version"),
        totals.get("requests"),
        totals.get("escalated"),
        d.get("api_url"),
    ]


@api_command
async def _list_devices(args: argparse.Namespace, api: ControlApi) -> int:
    header = ["DEVICE", "STATE", "MODEL", "VERSION", "REQUESTS", "ESCALATED", "API"]
    return await _list(args, api, "/api/devices", "devices", header, _device_row)


def _model_row(m: dict[str, Any]) -> list[Any]:
    acc = (m.get("evaluation") or {}).get(ACCURACY)
    return [
        m["name"],
        m["variant"],
        m["version"],
        m["release"],
        m["precision"],
        m["artifact"]["size"],
        f"{acc:.2%}" if acc is not None else None,
    ]


@api_command
async def _list_models(args: argparse.Namespace, api: ControlApi) -> int:
    header = ["NAME", "VARIANT", "VERSION", "RELEASE", "PRECISION", "BYTES", "ACCURACY"]
    return await _list(args, api, "/api/models", "models", header, _model_row)


async def _rollout(args: argparse.Namespace, api: ControlApi) -> int:
    rollout_id = await api.rollout(args.model, args.version, args.device, args.allow_downgrade)
    if not args.wait:
        print(rollout_id)
        return 0
    progress = RolloutProgress(sys.stderr)
    try:
        state = await api.wait_rollout(rollout_id, args.timeout, progress)
    finally:
        progress.done()
    print(json.dumps(state, indent=2))
    return 0 if state["state"] == "succeeded" else 1


def _stage_counts(devices: dict[str, dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for d in devices.values():
        counts[d["stage"]] = counts.get(d["stage"], 0) + 1
    return ", ".join(f"{stage} {n}" for stage, n in sorted(counts.items()))


def _rollout_row(r: dict[str, Any]) -> list[Any]:
    devices = r.get("devices") or {}
    return [r["id"], r["model"], r["version"], r["state"], r.get("seconds"), _stage_counts(devices)]


ROLLOUT_HEADER = ["ID", "MODEL", "VERSION", "STATE", "SECONDS", "DEVICES"]


@api_command
async def _list_rollouts(args: argparse.Namespace, api: ControlApi) -> int:
    return await _list(args, api, "/api/rollouts", "rollouts", ROLLOUT_HEADER, _rollout_row)


def _rollout_table(r: dict[str, Any]) -> str:
    devices = sorted((r.get("devices") or {}).items())
    rows = [[d, s.get("package") or "onnx", s["stage"], s.get("error")] for d, s in devices]
    return (
        table([_rollout_row(r)], ROLLOUT_HEADER)
        + "\n\n"
        + table(rows, ["DEVICE", "PACKAGE", "STAGE", "ERROR"])
    )


@api_command
async def _show_rollout(args: argparse.Namespace, api: ControlApi) -> int:
    rollout_id = check_name(args.rollout_id, "rollout id")  # a path segment: checked first
    doc = await api.get(f"/api/rollouts/{rollout_id}")
    print(render(doc, args.output, _rollout_table))
    return 0
