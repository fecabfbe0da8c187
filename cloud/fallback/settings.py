"""``fogline fallback serve``'s settings: one object, from flags and environment.

Every flag has an environment variable, ``FOGLINE_FALLBACK_`` + the flag in
capitals (``--keep-versions`` → ``FOGLINE_FALLBACK_KEEP_VERSIONS``), so a
Kubernetes Deployment configures a replica without a command line. A flag on
the command line wins over its variable; a repeatable flag's variable holds a
comma-separated list; a switch's holds ``1|true|yes|on`` or ``0|false|no|off``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.batch_cli import add_batching_flags, batch_settings_from_args
from common.batch_settings import BatchSettings
from common.errors import InvalidInputError
from common.request_body import DEFAULT_MAX_BODY

ENV_PREFIX = "FOGLINE_FALLBACK_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
SECRETS = {"control_token", "tokens", "admin_tokens"}  # --help never shows their values


@dataclass
class FallbackSettings:
    """Everything ``fogline fallback serve`` needs, built once in the entry point."""

    host: str = "127.0.0.1"
    port: int = 8000
    packages: list[Path] = field(default_factory=list)  # pinned package directories
    trusted_keys: list[str] = field(default_factory=list)  # hex Ed25519; empty: digests only
    tokens: set[str] | None = None  # static bearer tokens; None (and no device_tokens): open
    device_tokens: bool = False  # accept device tokens signed by a trusted key
    max_inflight: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY  # largest infer body; 413 past it
    body_timeout_s: float = 30.0  # a body not in within this gets 408 (and never held a slot)
    intra_op_threads: int = 0  # ONNX Runtime threads per model; 0 lets it pick (one per core)
    control_url: str | None = None  # fetch models from this control plane
    control_token: str | None = None  # an operator token (viewer) for that control plane
    models: list[str] = field(default_factory=list)  # pinned NAME:VERSION, cloud variant
    cache_dir: Path = Path("fogline-fallback-cache")
    refresh_keys: bool = True  # with control_url: learn rotations and revocations from it
    key_refresh_s: float = 60.0  # keyrings and revoked devices, again this often while serving
    # Following: every published model matching model_pattern (from control_url), or
    # the packages under models_dir; on when either is set, or with control_url alone.
    model_pattern: str | None = None
    models_dir: Path | None = None
    variant: str = "cloud"  # which variant to follow
    poll_s: float = 10.0  # how often to look for new versions
    keep_versions: int = 2  # loaded versions per model; older ones are unloaded
    admin_tokens: set[str] = field(default_factory=set)  # may load/unload without a control
    operator_cache_s: float = 30.0  # how long a control plane's word on a token is kept
    drain_timeout_s: float = 30.0  # SIGTERM: longest wait for in-flight requests
    # Dynamic batching; max_batch 0: from the package's hints. None: every request alone.
    batching: BatchSettings | None = field(default_factory=lambda: BatchSettings(max_batch=0))

    @property
    def following(self) -> bool:
        """Whether the server follows a registry (else it serves pinned packages only)."""
        if self.model_pattern is not None or self.models_dir is not None:
            return True
        return bool(self.control_url) and not self.models and not self.packages


def register_cli(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    environ: Mapping[str, str] | None = None,
) -> None:
    """Add ``serve`` to the ``fogline fallback`` group (defaults from ``environ``)."""
    p = subparsers.add_parser(
        "serve",
        help="serve model packages over V2 REST",
        description=(
            "Serve signed model packages over the V2 protocol: pinned (--package, --model), "
            "or following every published version (--control alone, --models PATTERN, "
            "--models-dir DIR). Every flag also reads FOGLINE_FALLBACK_<FLAG> from the "
            "environment (lists comma-separated); the command line wins."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _where(p)
    _what(p)
    _who(p)
    _limits(p)
    _env_defaults(p, os.environ if environ is None else environ)
    p.set_defaults(func=_serve_command)


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port (0: any)")
    p.add_argument("--control", dest="control_url", metavar="URL", help="control plane base URL")
    p.add_argument(
        "--control-token",
        metavar="TOKEN",
        help="viewer token for --control (also read from $FOGLINE_CONTROL_TOKEN)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("fogline-fallback-cache"),
        help="where fetched packages are kept",
    )


def _what(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--package",
        dest="packages",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="pin: a package directory to serve (repeatable)",
    )
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="NAME:VERSION",
        help="pin: fetch the cloud variant of this version from --control (repeatable)",
    )
    p.add_argument(
        "--models",
        dest="model_pattern",
        metavar="PATTERN",
        help="follow: every published model whose name matches this glob (default with "
        "--control alone: *)",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        metavar="DIR",
        help="follow: the signed packages under DIR (synced by other means), watched",
    )
    p.add_argument("--variant", default="cloud", help="the variant to follow")
    p.add_argument("--poll-s", type=float, default=10.0, help="seconds between looks for news")
    p.add_argument(
        "--keep-versions", type=int, default=2, help="loaded versions per model (latest N)"
    )


def _who(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-key",
        dest="trusted_keys",
        action="append",
        default=[],
        metavar="HEX",
        help="trusted Ed25519 public key (repeatable); verify packages",
    )
    p.add_argument(
        "--no-key-refresh",
        dest="refresh_keys",
        action="store_false",
        help="do not update the --trust-key keys from --control's signed keyring",
    )
    p.add_argument(
        "--key-refresh-s",
        type=float,
        default=60.0,
        help="how often to pull the control plane's keyrings and its list of revoked "
        "devices (a revoked device's token is refused within this) (default: %(default)s)",
    )
    p.add_argument(
        "--token",
        dest="tokens",
        action="append",
        default=[],
        metavar="TOKEN",
        help="accepted bearer token (repeatable)",
    )
    p.add_argument("--tokens-file", type=Path, metavar="FILE", help="tokens, one a line")
    p.add_argument(
        "--device-tokens",
        action="store_true",
        help="accept device tokens signed by a --trust-key (issued at enrollment)",
    )
    p.add_argument(
        "--admin-token",
        dest="admin_tokens",
        action="append",
        default=[],
        metavar="TOKEN",
        help="a secret that may load/unload models (for --models-dir without --control; "
        "with --control, operator tokens are checked there)",
    )
    p.add_argument(
        "--operator-cache-s",
        type=float,
        default=30.0,
        help="how long the control plane's answer on an operator token is cached",
    )


def _limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-inflight", type=int, default=64, help="concurrent infers before 503")
    p.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest infer body (413)"
    )
    p.add_argument(
        "--body-timeout",
        dest="body_timeout_s",
        type=float,
        default=30.0,
        help="seconds a request body may take to arrive (408)",
    )
    p.add_argument(
        "--threads",
        dest="intra_op_threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads per model (0: one per core)",
    )
    add_batching_flags(p)
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=30.0,
        help="on SIGTERM, the longest wait for in-flight requests",
    )


def env_name(action: argparse.Action) -> str:
    """``--keep-versions`` → ``FOGLINE_FALLBACK_KEEP_VERSIONS``."""
    flag = max(action.option_strings, key=len)
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _env_defaults(p: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Each flag's default from its variable, and both named in ``--help``.

    A bad switch value is kept for ``settings_from_args`` to refuse: building the
    parser must not fail (``fogline --help`` would).
    """
    errors = []
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = env_name(action)
        action.help = f"{action.help or ''} [env {name}]"
        if action.dest in SECRETS:  # "%(default).0s": the formatter adds no default
            action.help += " (default: none; a value set is not shown)%(default).0s"
        if name not in environ:
            continue
        value = environ[name]
        if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
            if value.strip().lower() not in _TRUE | _FALSE:
                errors.append(f"{name} must be true or false, got {value!r}")
                continue
            given = value.strip().lower() in _TRUE
            action.default = action.const if given else action.default
        elif isinstance(action, argparse._AppendAction):
            convert = action.type or str
            items = [v.strip() for v in value.split(",") if v.strip()]
            action.default = [convert(v) for v in items]  # type: ignore[operator]
        else:
            action.default = value  # a string default goes through the flag's type
    p.set_defaults(env_errors=errors)


def settings_from_args(args: argparse.Namespace) -> FallbackSettings:
    """The settings, with every value checked (InvalidInputError names the flag)."""
    _check_args(args)
    tokens = set(args.tokens)
    if args.tokens_file is not None:
        tokens |= read_tokens(args.tokens_file)
    return FallbackSettings(
        host=args.host,
        port=args.port,
        packages=list(args.packages),
        trusted_keys=list(args.trusted_keys),
        tokens=tokens or None,
        device_tokens=args.device_tokens,
        max_inflight=args.max_inflight,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout_s,
        intra_op_threads=args.intra_op_threads,
        control_url=args.control_url,
        control_token=args.control_token or os.environ.get("FOGLINE_CONTROL_TOKEN"),
        models=list(args.models),
        cache_dir=args.cache_dir,
        refresh_keys=args.refresh_keys,
        key_refresh_s=args.key_refresh_s,
        model_pattern=args.model_pattern,
        models_dir=args.models_dir,
        variant=args.variant,
        poll_s=args.poll_s,
        keep_versions=args.keep_versions,
        admin_tokens=set(args.admin_tokens),
        operator_cache_s=args.operator_cache_s,
        drain_timeout_s=args.drain_timeout_s,
        batching=batch_settings_from_args(args),
    )


def _check_args(args: argparse.Namespace) -> None:
    for error in getattr(args, "env_errors", []):
        raise InvalidInputError(error)
    if args.max_inflight < 1:
        raise InvalidInputError("--max-inflight must be at least 1")
    if args.max_body_bytes < 1 or args.body_timeout_s <= 0:
        raise InvalidInputError("--max-body-bytes and --body-timeout must be positive")
    for flag in ("key_refresh_s", "poll_s", "operator_cache_s"):
        if not getattr(args, flag) > 0:  # also refuses NaN
            raise InvalidInputError(f"--{flag.replace('_', '-')} must be positive")
    if not args.drain_timeout_s >= 0:
        raise InvalidInputError("--drain-timeout-s must be 0 or more")
    if args.keep_versions < 1:
        raise InvalidInputError("--keep-versions must be at least 1")
    pinned = args.packages or args.models
    if pinned and (args.model_pattern is not None or args.models_dir is not None):
        raise InvalidInputError("pin (--package/--model) or follow (--models/--models-dir)")
    if args.model_pattern is not None and not args.control_url:
        raise InvalidInputError("--models needs --control (where to look)")


def read_tokens(path: Path) -> set[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InvalidInputError(f"cannot read tokens file: {exc}") from exc
    tokens = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    if not tokens:
        raise InvalidInputError(f"{path} holds no tokens")
    return tokens


def _serve_command(args: argparse.Namespace) -> int:
    from cloud.fallback.server import serve_command  # the server imports onnxruntime: lazily

    return serve_command(args)
