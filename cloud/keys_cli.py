"""``fogline keys create|list|rotate|retire|revoke|add`` and ``fogline model sign``.

Key changes work two ways. Offline, on the control plane's workdir
(``--workdir D``) while it is stopped: the CLI takes the key directory's lock,
so it refuses while a control plane holds it; the control plane sends the new
keyrings to devices when they next report in. Online (``--control URL``): the
running control plane makes the change itself and pushes it to the fleet at
once. Release keys are made anywhere (``create --release --out FILE``) and
only their public half is added to the keyring (``add``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud.cli_output import add_output_args
from cloud.cli_output import render as render_as
from cloud.cli_output import table as _table
from cloud.control_cli import DEFAULT_CONTROL, TOKEN_ENV, client_from_args
from cloud.control_client import ControlError
from cloud.keys import KeyStore
from common.errors import AlreadyExistsError, FoglineError, InvalidInputError, VerificationError
from common.fsutil import write_private
from common.manifest import (
    SignedManifest,
    artifact_bytes,
    file_entry,
    read_package,
    read_unsigned,
    write_package,
)
from common.names import check_name
from common.signing import Signer

HEADER = ["KEY ID", "ROLE", "STATE", "PUBLIC KEY"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``fogline keys`` group."""
    create = subparsers.add_parser(
        "create",
        help="create the control plane's first key, or an offline release key",
        description="Create the control plane's first signing key in WORKDIR/keys/ (0700, "
        "key 0600), or with --release an offline release key in --out FILE (0600) whose "
        "public key is printed for `fogline keys add`.",
    )
    create.add_argument("--workdir", type=Path, help="the control plane's workdir")
    create.add_argument("--release", action="store_true", help="an offline release key")
    create.add_argument("--out", type=Path, help="where to write the release key (0600)")
    create.set_defaults(func=_create)
    _where(subparsers.add_parser("list", help="keys with role and state"), _list)
    _where(
        subparsers.add_parser(
            "rotate",
            help="new active key; the fleet learns it from a keyring signed by the old one",
        ),
        _rotate,
    )
    for action, text in (
        ("retire", "stop trusting a key for anything new (installed models still load)"),
        ("revoke", "refuse everything a key ever signed, for good"),
    ):
        p = _where(subparsers.add_parser(action, help=text, description=text + "."), _change)
        p.add_argument("key_id", metavar="KEY_ID")
        p.set_defaults(action=action)
    p = _where(
        subparsers.add_parser("add", help="trust a release key made with create --release"),
        _change,
    )
    p.add_argument("public_key", metavar="PUBLIC_KEY", help="64 hex digits")
    p.add_argument(
        "--role",
        default="release",
        choices=["release", "control"],
        help="release: signs packages offline; control: a control plane's signing key",
    )
    p.set_defaults(action="add")


def _where(p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> Any:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--workdir", type=Path, help="change the keys offline (server stopped)")
    group.add_argument("--control", help=f"ask a running control plane (e.g. {DEFAULT_CONTROL})")
    p.add_argument(
        "--token", help=f"with --control: an admin token (viewer to list; default: ${TOKEN_ENV})"
    )
    add_output_args(p)
    p.set_defaults(func=func)
    return p


def register_model_sign(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fogline model sign``: sign a package offline."""
    p = subparsers.add_parser(
        "sign",
        help="sign a package offline with a release key",
        description="Sign a package's manifest.unsigned.json with a release key into "
        "manifest.json; `fogline model publish` then uploads it as it is.",
    )
    p.add_argument("--package", type=Path, required=True, help="package directory")
    p.add_argument("--key", type=Path, required=True, help="release key (PEM)")
    p.set_defaults(func=_sign)


def _run(body: Callable[[], Any], fmt: str, render: Callable[[Any], str]) -> int:
    """Errors of the operator's input exit 2, of the connection 1; never a traceback."""
    try:
        result = body()
    except ControlError as exc:  # the call failed, not the operator's input
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FoglineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render_as(result, fmt, render))
    return 0


def _create(args: argparse.Namespace) -> int:
    def body() -> dict[str, str]:
        if args.release:
            if args.out is None:
                raise InvalidInputError("--release needs --out FILE")
            if args.out.exists():
                raise AlreadyExistsError(f"{args.out} exists; not overwriting a key")
            signer = Signer.generate()
            write_private(args.out, signer.to_pem())
            role = "release"
        else:
            if args.workdir is None:
                raise InvalidInputError("give --workdir (control key) or --release --out FILE")
            store = KeyStore(args.workdir)
            with store.locked():
                signer = store.create()
            role = "control"
        return {"key_id": signer.key_id, "public_key": signer.public_key_hex, "role": role}

    def render(r: dict[str, str]) -> str:
        release = r["role"] == "release"
        hint = f"\ntrust it with: fogline keys add {r['public_key']}" if release else ""
        return f"{r['role']} key {r['key_id']}\npublic key {r['public_key']}{hint}"

    return _run(body, "table", render)


def _list(args: argparse.Namespace) -> int:
    def body() -> Any:
        if args.control:
            return client_from_args(args).get("/api/keys")["keys"]
        return KeyStore(_workdir(args)).listing()

    return _run(body, args.output, _render_keys)


def _render_keys(rows: list[dict[str, str]]) -> str:
    return _table([[r["key_id"], r["role"], r["state"], r["public_key"]] for r in rows], HEADER)


def _workdir(args: argparse.Namespace) -> Path:
    if args.workdir is None:
        raise InvalidInputError("give --workdir D (offline) or --control URL (running)")
    return Path(args.workdir)


def _rotate(args: argparse.Namespace) -> int:
    def body() -> Any:
        if args.control:
            return client_from_args(args).post_json("/api/keys/rotate", {})
        store = KeyStore(_workdir(args))
        with store.locked():
            old, new = store.rotate()
        return {"key_id": new.key_id, "previous": old.key_id, "sent": 0}

    def render(r: dict[str, Any]) -> str:
        return (
            f"active key {r['key_id']} (was {r['previous']}, still trusted until "
            f"`fogline keys retire {r['previous']}`); keyring sent to {r['sent']} devices"
        )

    return _run(body, args.output, render)


def _change(args: argparse.Namespace) -> int:
    def body() -> Any:
        arg = args.public_key if args.action == "add" else check_name(args.key_id, "key id")
        if args.control:
            client = client_from_args(args)
            if args.action == "add":
                return client.post_json("/api/keys", {"public_key": arg, "role": args.role})
            return client.post_json(f"/api/keys/{arg}/{args.action}", {})
        store = KeyStore(_workdir(args))
        with store.locked():
            if args.action == "add":
                store.add(arg, args.role)
            else:
                {"retire": store.retire, "revoke": store.revoke}[args.action](arg)
            return {"version": store.current().version, "sent": 0}

    def render(r: dict[str, Any]) -> str:
        return f"{args.action}: keyring version {r['version']}, sent to {r['sent']} devices"

    return _run(body, args.output, render)


def _sign(args: argparse.Namespace) -> int:
    def body() -> dict[str, str]:
        try:
            pem = args.key.read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"cannot read key {args.key}: {exc}") from exc
        signer = Signer.from_pem(pem, str(args.key))
        manifest = read_unsigned(args.package)
        for f in manifest.files:  # sign only what is there: every file as the manifest says
            path = args.package / f.name
            if not path.is_file() or file_entry(path, f.role) != f:
                raise VerificationError(f"{path}: missing, or size or SHA-256 differs")
        # The chunk list is signed too (agents check each chunk against it); the control
        # plane checks it against the files and stores the package as signed here.
        manifest = manifest.with_chunks(artifact_bytes(args.package, manifest))
        write_package(args.package, SignedManifest.sign(manifest, signer))
        signed = read_package(args.package)
        return {"key_id": signed.key_id, "name": manifest.name, "version": manifest.version}

    def render(r: dict[str, str]) -> str:
        return f"signed {r['name']} {r['version']} with key {r['key_id']}"

    return _run(body, "table", render)
