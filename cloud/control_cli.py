"""``fogline control serve`` and the operator commands that talk to it
(``fogline model publish``, ``fogline model rollout``, ``fogline control devices|models``).

Every client command sends an operator token: ``--token`` or ``FOGLINE_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from common.errors import FoglineError, InvalidInputError
from common.manifest import MANIFEST_FILE, UNSIGNED_MANIFEST_FILE, read_package, read_unsigned

logger = logging.getLogger(__name__)

DEFAULT_CONTROL = "http://127.0.0.1:8000"
TOKEN_ENV = "FOGLINE_TOKEN"


def register_control(subparsers: argparse._SubParsersAction) -> None:
    from cloud.token_cli import register_token

    _register_serve(subparsers)
    register_token(subparsers)
    for name, help_text in (
        ("devices", "list the fleet: state, model, version, traffic"),
        ("models", "list published model versions"),
    ):
        p = subparsers.add_parser(name, help=help_text, description=help_text + ".")
        _client_args(p)
        p.add_argument("--json", action="store_true", help="print the API's JSON instead")
        p.set_defaults(func=_list_devices if name == "devices" else _list_models)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", default=DEFAULT_CONTROL, help="control plane base URL")
    p.add_argument(
        "--token", help=f"operator token (default: ${TOKEN_ENV}); see `fogline control token`"
    )


def client_from_args(args: argparse.Namespace) -> ControlClient:
    """The client a command uses: ``--control`` and ``--token`` or ``$FOGLINE_TOKEN``."""
    return ControlClient(args.control, token=args.token or os.environ.get(TOKEN_ENV))


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
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--public-url",
        help="base URL agents use for HTTP artifact downloads (default: http://HOST:PORT)",
    )
    serve.add_argument(
        "--database",
        metavar="URL",
        help="postgresql://… for state shared by replicas (default: WORKDIR/control.sqlite)",
    )
    serve.add_argument(
        "--require-offline-signature",
        action="store_true",
        help="accept only packages signed offline by a release key (fogline model sign), "
        "so that a stolen operator token alone cannot ship a model",
    )
    serve.add_argument("--broker-host", default="127.0.0.1")
    serve.add_argument("--broker-port", type=int, default=1883)
    serve.add_argument(
        "--broker-username",
        help="broker login (default: WORKDIR/broker-control.json, made by `fogline broker config`)",
    )
    serve.add_argument("--broker-password-file", type=Path, help="file holding the password")
    serve.add_argument("--broker-tls-ca", help="CA file: connect to the broker with TLS")
    serve.add_argument(
        "--mqtt-client-id",
        metavar="NAME",
        help="stable MQTT client id: a persistent session that survives restarts; keep it "
        "secret or ACL-protected (default: a random id per process, clean session)",
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
    _client_args(pub)
    pub.set_defaults(func=_publish)
    roll = subparsers.add_parser(
        "rollout",
        help="roll a published edge model out to devices over MQTT",
        description="Start a rollout and, with --wait, show its progress until it ends.",
    )
    roll.add_argument("--model", required=True)
    roll.add_argument("--version", required=True)
    roll.add_argument("--device", action="append", help="target device (default: all online)")
    roll.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="roll out a lower release than devices run (needs an admin token)",
    )
    _client_args(roll)
    roll.add_argument("--wait", action="store_true", help="wait and print progress")
    roll.add_argument("--timeout", type=float, default=300.0)
    roll.set_defaults(func=_rollout)


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
        database=args.database,
        mqtt_client_id=args.mqtt_client_id,
        max_upload_bytes=args.max_upload_bytes,
        require_offline_signature=args.require_offline_signature,
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
    from cloud.enrollment import CONTROL_CREDENTIALS_FILE, read_control_credentials

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
    path = args.workdir / CONTROL_CREDENTIALS_FILE
    if not path.exists():
        return None, None
    creds = read_control_credentials(path)
    return creds.username, creds.password


# -- HTTP client helpers (stdlib only: operators need nothing else installed) -----------


class ControlError(RuntimeError):
    """The control plane answered with an HTTP error; the message is one line."""

    def __init__(self, method: str, path: str, status: int, detail: str) -> None:
        self.status = status
        hint = ""
        if status == 401:
            hint = f" (give --token or set {TOKEN_ENV}; tokens: `fogline control token create`)"
        elif status == 403:
            hint = " (this token's role does not allow it)"
        super().__init__(f"{method} {path}: HTTP {status}: {detail}{hint}")


class ControlClient:
    """A small synchronous client of the control plane's REST API."""

    def __init__(self, base_url: str, timeout: float = 30.0, *, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        headers = {**self._auth, **(headers or {})}
        url = self.base_url + path
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ControlError(method, path, exc.code, _error_text(exc.read())) from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post_json(self, path: str, doc: dict[str, Any]) -> Any:
        return self.request(
            "POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"}
        )

    def publish(self, package_dir: Path) -> dict[str, Any]:
        """Upload; a package signed offline (``manifest.json``) goes as ``signed_manifest``."""
        boundary = uuid.uuid4().hex
        if (package_dir / MANIFEST_FILE).is_file():
            signed = read_package(package_dir).to_dict()  # its files match it, or this raises
            manifest = signed["manifest"]
            parts = [_part(boundary, "signed_manifest", None, json.dumps(signed).encode())]
        else:
            manifest = read_unsigned(package_dir).to_dict()
            parts = [_part(boundary, "manifest", None, json.dumps(manifest).encode())]
        for f in manifest["files"]:
            parts.append(
                _part(boundary, f["name"], f["name"], (package_dir / f["name"]).read_bytes())
            )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request(
            "POST",
            "/api/models",
            body,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )

    def rollout(
        self,
        model: str,
        version: str,
        devices: list[str] | None = None,
        allow_downgrade: bool = False,
    ) -> str:
        doc: dict[str, Any] = {
            "model": model,
            "version": version,
            "allow_downgrade": allow_downgrade,
        }
        if devices:
            doc["devices"] = devices
        return self.post_json("/api/rollouts", doc)["id"]

    def wait_rollout(self, rollout_id: str, timeout: float, progress: Any = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            state = self.get(f"/api/rollouts/{rollout_id}")
            if progress is not None:
                progress(state)
            if state["state"] != "running" or time.monotonic() > deadline:
                return state
            time.sleep(0.2)


def _error_text(body: bytes) -> str:
    """The ``error`` of a JSON error body, else the body itself, on one line."""
    try:
        doc = json.loads(body)
        text = str(doc["error"]) if isinstance(doc, dict) and "error" in doc else body.decode()
    except (ValueError, UnicodeDecodeError):
        text = body.decode(errors="replace")
    return " ".join(text.split())[:500]


def _part(boundary: str, name: str, filename: str | None, data: bytes) -> bytes:
    disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
    head += "Content-Type: application/octet-stream\r\n\r\n"
    return head.encode() + data + b"\r\n"


def _publish(args: argparse.Namespace) -> int:
    try:
        record = client_from_args(args).publish(args.package)
    except FoglineError as exc:  # no or bad unsigned manifest: the operator's input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header, *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _list(args: argparse.Namespace, path: str, key: str, header: list[str], row: Any) -> int:
    try:
        doc = client_from_args(args).get(path)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if args.json else _table([row(x) for x in doc[key]], header))
    return 0


def _list_devices(args: argparse.Namespace) -> int:
    def row(d: dict[str, Any]) -> list[Any]:
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

    header = ["DEVICE", "STATE", "MODEL", "VERSION", "REQUESTS", "ESCALATED", "API"]
    return _list(args, "/api/devices", "devices", header, row)


def _list_models(args: argparse.Namespace) -> int:
    def row(m: dict[str, Any]) -> list[Any]:
        acc = (m.get("evaluation") or {}).get("accuracy")
        return [
            m["name"],
            m["variant"],
            m["version"],
            m["release"],
            m["precision"],
            m["artifact"]["size"],
            f"{acc:.2%}" if acc is not None else None,
        ]

    header = ["NAME", "VARIANT", "VERSION", "RELEASE", "PRECISION", "BYTES", "ACCURACY"]
    return _list(args, "/api/models", "models", header, row)


def _print_progress(state: dict[str, Any]) -> None:
    stages = ", ".join(f"{d}: {s['stage']}" for d, s in sorted(state["devices"].items()))
    print(f"\r[{state['seconds']:6.1f}s] {state['state']}: {stages}", end="", file=sys.stderr)


def _rollout(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    try:
        rollout_id = client.rollout(args.model, args.version, args.device, args.allow_downgrade)
        if not args.wait:
            print(rollout_id)
            return 0
        state = client.wait_rollout(rollout_id, args.timeout, _print_progress)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    print(json.dumps(state, indent=2))
    return 0 if state["state"] == "succeeded" else 1
