"""``fogline control token create|list|revoke``: operator tokens, on the control plane's host.

These commands open the control plane's database directly (its workdir, or
``--database``), not the REST API: the first admin token has to come from
somewhere, and whoever can read the workdir owns the control plane anyway.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cloud.cli_output import add_output_args, render, table
from cloud.operator_tokens import ROLES
from cloud.registry import Registry
from common.errors import FoglineError


def register_token(subparsers: argparse._SubParsersAction) -> None:
    token = subparsers.add_parser(
        "token",
        help="operator tokens: create, list, revoke (on the control plane's host)",
        description="Operator tokens for the REST API and the `fogline` client commands. "
        "Stored hashed in the control plane's database; the token is printed once.",
    )
    sub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a token and print it (once)")
    create.add_argument("name", help="who holds it (A-Z a-z 0-9 . _ -)")
    create.add_argument(
        "--role",
        choices=ROLES,
        required=True,
        help="what the token may do (metrics: scrape /metrics only; viewer reads)",
    )
    create.set_defaults(func=_create)
    listing = sub.add_parser("list", help="list tokens (names and roles, never the tokens)")
    add_output_args(listing)
    listing.set_defaults(func=_list)
    revoke = sub.add_parser("revoke", help="revoke a token: it stops working at once")
    revoke.add_argument("name")
    revoke.set_defaults(func=_revoke)
    for p in (create, listing, revoke):
        p.add_argument(
            "--workdir",
            type=Path,
            default=Path("fogline-control"),
            help="the control plane's workdir (default: %(default)s)",
        )
        p.add_argument("--database", metavar="URL", help="postgresql://… if the plane uses one")


def open_registry(workdir: Path, database: str | None = None) -> Registry:
    """The control plane's registry, as ``fogline control serve --workdir`` opens it."""
    from cloud.control_server import ControlSettings

    settings = ControlSettings(workdir=workdir, database=database)
    workdir.mkdir(parents=True, exist_ok=True)
    return Registry(settings.database or settings.db_path, settings.store_dir)


def create_token(workdir: Path, name: str, role: str, database: str | None = None) -> str:
    """Create an operator token in a control plane's database (the demo uses this too)."""
    registry = open_registry(workdir, database)
    try:
        return registry.operators.create(name, role)
    finally:
        registry.close()


def _run(args: argparse.Namespace, action: str) -> int:
    try:
        registry = open_registry(args.workdir, args.database)
    except (FoglineError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if action == "create":
            print(registry.operators.create(args.name, args.role))
        elif action == "revoke":
            registry.operators.revoke(args.name)
            print(f"revoked {args.name}", file=sys.stderr)
        else:
            print(render(registry.operators.list(), args.output, _token_table))
    except FoglineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        registry.close()
    return 0


def _token_table(tokens: list[dict[str, Any]]) -> str:
    rows = [[t["name"], t["role"], "revoked" if t["revoked"] else "active"] for t in tokens]
    return table(rows, ["NAME", "ROLE", "STATE"])


def _create(args: argparse.Namespace) -> int:
    return _run(args, "create")


def _list(args: argparse.Namespace) -> int:
    return _run(args, "list")


def _revoke(args: argparse.Namespace) -> int:
    return _run(args, "revoke")
