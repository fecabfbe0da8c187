"""``fogline device enroll|list|revoke`` and ``fogline broker config``.

Both work offline on the control plane's workdir (see cloud/enrollment.py).
Bad input is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from cloud import enrollment
from cloud.cli_output import add_output_args, render, table
from common.broker_auth import TlsFiles
from common.cli_errors import one_line_errors

logger = logging.getLogger(__name__)

_WORKDIR_HELP = "the control plane's workdir (its keys and enrollments)"


def register_device(subparsers: argparse._SubParsersAction) -> None:
    enroll = subparsers.add_parser(
        "enroll",
        help="enroll a device: write its agent config with broker credentials, keys, token",
        description="Enroll DEVICE_ID (again: rotate its broker password) and write its "
        "agent config (JSON, 0600): broker username and password, the trusted public keys, "
        "the fallback URL and a token for it. Then regenerate the broker config.",
    )
    enroll.add_argument("device_id", metavar="DEVICE_ID")
    enroll.add_argument("--workdir", type=Path, required=True, help=_WORKDIR_HELP)
    enroll.add_argument("--out", type=Path, required=True, help="agent config file to write")
    enroll.add_argument("--label", action="append", metavar="KEY=VALUE", help="repeatable")
    enroll.add_argument("--model", default="digits", help="model this device serves")
    enroll.add_argument("--state-dir", help="agent state dir (default: /var/lib/fogline/ID)")
    enroll.add_argument("--broker-host", default="127.0.0.1", help="broker host the agent uses")
    enroll.add_argument("--broker-port", type=int, default=1883, help="broker port the agent uses")
    enroll.add_argument("--broker-tls-ca", help="CA file the agent trusts for the broker's TLS")
    enroll.add_argument("--fallback-url", help="base URL of the cloud fallback's V2 API")
    enroll.add_argument(
        "--control-url",
        help="the control plane's base URL as the device reaches it: the escalations it was "
        "unsure of go there as hard examples (default: none are kept)",
    )
    enroll.add_argument(
        "--token-days", type=float, default=30.0, help="fallback token lifetime (days)"
    )
    enroll.set_defaults(func=one_line_errors(_enroll))
    listing = subparsers.add_parser("list", help="list enrolled devices")
    listing.add_argument("--workdir", type=Path, required=True, help=_WORKDIR_HELP)
    add_output_args(listing)
    listing.set_defaults(func=one_line_errors(_list))
    revoke = subparsers.add_parser(
        "revoke", help="forget a device (regenerate the broker config afterwards)"
    )
    revoke.add_argument("device_id", metavar="DEVICE_ID")
    revoke.add_argument("--workdir", type=Path, required=True, help=_WORKDIR_HELP)
    revoke.set_defaults(func=one_line_errors(_revoke))


def register_broker(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser(
        "config",
        help="write mosquitto.conf, a password file and an ACL for the enrolled devices",
        description="Write DIR/mosquitto.conf, DIR/passwd and DIR/acl: every enrolled device "
        "and the control plane get their own login and topics; anonymous clients are "
        "refused. Run mosquitto with `mosquitto -c DIR/mosquitto.conf`. Creates the control "
        "plane's broker login (WORKDIR/broker-control.json) if there is none.",
    )
    config.add_argument("--workdir", type=Path, required=True, help=_WORKDIR_HELP)
    config.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="directory for the three files"
    )
    config.add_argument("--port", type=int, default=1883, help="port the broker listens on")
    config.add_argument("--host", help="listen address (default: all)")
    config.add_argument("--tls-cert", type=Path, help="server certificate (PEM): TLS listener")
    config.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    config.add_argument("--ca", type=Path, help="CA certificate (PEM) for client certificates")
    config.add_argument("--run-as", help="user mosquitto drops to when started as root")
    config.add_argument(
        "--control-replicas",
        type=int,
        default=1,
        metavar="N",
        help="control-plane replicas that share one PostgreSQL (--share-group): each gets "
        "its own login, WORKDIR/broker-control.json for replica 1 and "
        "WORKDIR/broker-control-K.json for replica K; start replica K with "
        "`fogline control serve --replica K` (default: %(default)s)",
    )
    config.set_defaults(func=one_line_errors(_broker_config))


def _enroll(args: argparse.Namespace) -> int:
    settings = enrollment.AgentSettings(
        model=args.model,
        state_dir=args.state_dir,
        broker_host=args.broker_host,
        broker_port=args.broker_port,
        broker_tls_ca=args.broker_tls_ca,
        fallback_url=args.fallback_url,
        control_url=args.control_url,
        token_lifetime_s=args.token_days * 86400.0,
    )
    labels = enrollment.parse_labels(args.label) if args.label else None
    enrollment.enroll_device(args.workdir, args.device_id, settings, labels, out=args.out)
    print(f"enrolled {args.device_id}: agent config in {args.out} (keep it secret)")
    return 0


def _list(args: argparse.Namespace) -> int:
    enrolled = enrollment.load_enrollments(args.workdir)
    rows = [
        {"device_id": e.device_id, "created_at": e.created_at, "labels": e.labels}
        for e in enrolled.values()
    ]
    print(render({"devices": rows}, args.output, _device_table))
    return 0


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seconds))


def _device_table(doc: dict[str, Any]) -> str:
    rows = []
    for d in doc["devices"]:
        labels = ",".join(f"{k}={v}" for k, v in d["labels"].items())
        rows.append([d["device_id"], _utc(d["created_at"]), labels])
    return table(rows, ["DEVICE", "ENROLLED", "LABELS"])


def _revoke(args: argparse.Namespace) -> int:
    enrollment.revoke_device(args.workdir, args.device_id)
    print(f"revoked {args.device_id}; regenerate the broker config and reload the broker")
    return 0


def _broker_config(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        print(f"error: --port {args.port} is not a TCP port", file=sys.stderr)
        return 1
    if (args.tls_cert is None) != (args.tls_key is None):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 1
    if args.ca is not None and args.tls_cert is None:
        print("error: --ca needs --tls-cert and --tls-key", file=sys.stderr)
        return 1
    tls = TlsFiles(args.tls_cert, args.tls_key, args.ca) if args.tls_cert else None
    files = enrollment.write_broker_config(
        args.workdir,
        args.out,
        port=args.port,
        host=args.host,
        tls=tls,
        run_as=args.run_as,
        control_replicas=args.control_replicas,
    )
    print(f"wrote {files.conf}, {files.password_file}, {files.acl_file}")
    return 0
