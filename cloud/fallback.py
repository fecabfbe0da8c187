"""The cloud fallback server: ``fogline fallback serve``.

Serves signed model packages over the V2 REST protocol (common.v2_server),
authenticates callers with bearer tokens and sheds load with 503 +
Retry-After. Stateless: replicas behind a load balancer scale it out.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from aiohttp import web

from cloud.package_cache import fetch_keyrings, fetch_package, parse_model_ref
from common.batch_cli import add_batching_flags, batch_settings_from_args
from common.batch_settings import BatchSettings
from common.batcher import with_batching
from common.device_token import verify_token
from common.errors import AuthError, CloudUnavailableError, FoglineError, InvalidInputError
from common.inference import MODEL_VERSION, SERVED_BY, InferRequest, InferResponse
from common.keyring import apply_chain
from common.manifest import read_package
from common.onnx_runtime import OnnxRuntime
from common.request_body import DEFAULT_MAX_BODY, RequestLimits
from common.runtime import ModelInfo, Runtime
from common.serving_metrics import ServingMetrics
from common.signing import TrustStore
from common.v2_server import DataPlane, build_v2_app

logger = logging.getLogger(__name__)

SERVER_NAME = "fogline-fallback"


@dataclass
class FallbackSettings:
    """Everything ``fogline fallback serve`` needs, built once in the entry point."""

    host: str = "127.0.0.1"
    port: int = 8000
    packages: list[Path] = field(default_factory=list)
    trusted_keys: list[str] = field(default_factory=list)  # hex Ed25519; empty: digests only
    tokens: set[str] | None = None  # static bearer tokens; None (and no device_tokens): open
    device_tokens: bool = False  # accept device tokens signed by a trusted key
    max_inflight: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY  # largest infer body; 413 past it
    body_timeout_s: float = 30.0  # a body not in within this gets 408 (and never held a slot)
    intra_op_threads: int = 0  # ONNX Runtime threads per model; 0 lets it pick (one per core)
    control_url: str | None = None  # fetch ``models`` from this control plane
    control_token: str | None = None  # an operator token (viewer) for that control plane
    models: list[str] = field(default_factory=list)  # NAME:VERSION, cloud variant
    cache_dir: Path = Path("fogline-fallback-cache")
    refresh_keys: bool = True  # with control_url: learn rotations and revocations from it
    key_refresh_s: float = 300.0  # and again this often while serving (device tokens)
    # Dynamic batching; max_batch 0: from the package's hints. None: every request alone.
    batching: BatchSettings | None = field(default_factory=lambda: BatchSettings(max_batch=0))


FALLBACK_RUNTIMES = web.AppKey("fogline.fallback.runtimes", list)


class CloudServed:
    """A runtime proxy that marks every answer as served by the cloud, and by which version."""

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner

    @property
    def info(self) -> ModelInfo:
        return self.inner.info

    @property
    def ready(self) -> bool:
        return self.inner.ready

    async def load(self) -> None:
        await self.inner.load()

    async def infer(self, request: InferRequest) -> InferResponse:
        response = await self.inner.infer(request)
        response.parameters[SERVED_BY] = "cloud"
        response.parameters[MODEL_VERSION] = self.inner.info.version
        return response

    async def unload(self) -> None:
        await self.inner.unload()


def serving_runtime(
    runtime: OnnxRuntime, batching: BatchSettings | None, metrics: ServingMetrics
) -> Runtime:
    """Wrap a model for serving (batched unless ``batching`` is None; ``load()`` it)."""
    return CloudServed(with_batching(runtime, batching, metrics))


async def load_package(directory: Path, trust: TrustStore | None, threads: int) -> OnnxRuntime:
    """Verify one package (signature if ``trust``, every file's digest) and load its model."""
    # "installed": a cached package signed by a key retired since still loads (the cache
    # would otherwise stop a restart after every rotation); a revoked key's never does.
    signed = await asyncio.to_thread(read_package, directory, trust, purpose="installed")
    manifest = signed.manifest
    if manifest.format != "onnx":
        raise InvalidInputError(f"{directory}: format {manifest.format!r}; this server runs onnx")
    runtime = OnnxRuntime(
        directory / manifest.file("model").name, manifest, intra_op_threads=threads
    )
    try:
        await runtime.load()
    except FoglineError:
        raise
    except Exception as exc:  # onnxruntime's own errors: the file is not a usable model
        raise InvalidInputError(f"{directory}: cannot load the model: {exc}") from exc
    return runtime


async def build_fallback_app(settings: FallbackSettings) -> web.Application:
    """Verify and load every package, then the V2 app serving them (unloaded on cleanup)."""
    trust = await trusted_keys(settings)  # before any fetch: it verifies what it fetches
    packages = list(settings.packages) + await _fetch_models(settings, trust)
    if not packages:
        raise InvalidInputError("no packages to serve: give --package or --model")
    if trust is None:
        logger.warning("no trusted keys: package signatures are not checked, only digests")
    dataplane = DataPlane(SERVER_NAME, _version())
    runtimes: list[Runtime] = []
    for directory in packages:
        model = await load_package(directory, trust, settings.intra_op_threads)
        runtime = serving_runtime(model, settings.batching, dataplane.metrics)
        await runtime.load()  # batched: the calibration
        if dataplane.has(runtime.info.name):
            raise InvalidInputError(f"two packages serve model {runtime.info.name!r}")
        dataplane.register(runtime)
        runtimes.append(runtime)
    verifier = None
    if settings.device_tokens:
        if trust is None:
            raise InvalidInputError("device tokens need --trust-key (the keys that sign them)")
        verifier = functools.partial(verify_token, trust)
    app = build_v2_app(
        dataplane,
        auth_tokens=settings.tokens,
        token_verifier=verifier,
        max_inflight=settings.max_inflight,
        limits=RequestLimits(
            max_body=settings.max_body_bytes,
            body_timeout_s=settings.body_timeout_s,
            decode_budget=2 * settings.max_body_bytes,
        ),
    )
    app[FALLBACK_RUNTIMES] = runtimes
    app.on_cleanup.append(_unload_all)
    if trust is not None and settings.control_url and settings.refresh_keys:
        app.cleanup_ctx.append(_key_refresher(settings, trust))
    return app


async def trusted_keys(settings: FallbackSettings) -> TrustStore | None:
    """The ``--trust-key`` keys, moved forward by the control plane's signed keyrings.

    A keyring counts only if signed by a key already trusted (``apply_chain``), so
    the control plane's answer can add a rotated key or drop a revoked one, never
    smuggle in a key of its own. Unreachable: the configured keys, with a warning.
    """
    if not settings.trusted_keys:
        return None
    trust = TrustStore(settings.trusted_keys)
    if not (settings.control_url and settings.refresh_keys):
        return trust
    try:
        chain = await fetch_keyrings(settings.control_url, settings.control_token)
    except (CloudUnavailableError, AuthError) as exc:  # unreachable, or no viewer token
        logger.warning("keyring not refreshed (%s): trusting the configured keys only", exc)
        return trust
    trust, _ = apply_chain(trust, chain, require_newer=False)
    logger.info("keyring %d: trusting %d keys", trust.version, len(trust.keys))
    return trust


def _key_refresher(settings: FallbackSettings, trust: TrustStore):  # type: ignore[no-untyped-def]
    """While serving, apply new keyrings to ``trust`` in place, so a key revoked at the
    control plane stops authenticating device tokens here within ``key_refresh_s``.
    (Packages are verified when loaded: a restart drops one whose key was revoked.)"""

    async def refresh_forever() -> None:
        while True:
            await asyncio.sleep(settings.key_refresh_s)
            try:
                chain = await fetch_keyrings(settings.control_url or "", settings.control_token)
                new, applied = apply_chain(trust, chain, require_newer=False)
            except FoglineError as exc:
                logger.warning("keyring not refreshed: %s", exc)
                continue
            if applied:
                trust.adopt(new)
                logger.info("keyring %d: trusting %d keys", new.version, len(new.keys))

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(refresh_forever(), name="fallback-key-refresh")
        yield
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    return ctx


async def _fetch_models(settings: FallbackSettings, trust: TrustStore | None) -> list[Path]:
    if settings.models and not settings.control_url:
        raise InvalidInputError("--model needs --control (where to fetch it from)")
    dirs = []
    for ref in settings.models:
        name, version = parse_model_ref(ref)
        dirs.append(
            await fetch_package(
                settings.control_url or "",
                name,
                version,
                variant="cloud",
                cache_dir=settings.cache_dir,
                trust=trust,
                token=settings.control_token,
            )
        )
    return dirs


async def _unload_all(app: web.Application) -> None:
    for runtime in app[FALLBACK_RUNTIMES]:
        await runtime.unload()


def _version() -> str:
    try:
        return metadata.version("fogline")
    except metadata.PackageNotFoundError:
        return "0+unknown"


async def serve(settings: FallbackSettings) -> None:
    """Run the fallback server until SIGINT or SIGTERM."""
    app = await build_fallback_app(settings)
    if settings.tokens is None and not settings.device_tokens:
        logger.warning("no tokens: the fallback API accepts any caller")
    # Per-request access lines only at DEBUG (STYLE: state changes at INFO, requests at DEBUG).
    access_log = logging.getLogger("aiohttp.access") if logger.isEnabledFor(logging.DEBUG) else None
    runner = web.AppRunner(app, access_log=access_log)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        host, port = runner.addresses[0][:2]
        logger.info(
            "fallback serving %s at http://%s:%s/v2", ", ".join(app_model_names(app)), host, port
        )
        await _until_signalled()
        logger.info("fallback shutting down")
    finally:
        await runner.cleanup()


def app_model_names(app: web.Application) -> list[str]:
    return [r.info.name for r in app[FALLBACK_RUNTIMES]]


async def _until_signalled() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# --- command line ----------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``serve`` to the ``fogline fallback`` group."""
    p = subparsers.add_parser(
        "serve",
        help="serve model packages over V2 REST",
        description="Serve signed model packages over the V2 protocol.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0: any)")
    p.add_argument(
        "--package",
        dest="packages",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="a package directory to serve (repeatable)",
    )
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="NAME:VERSION",
        help="fetch the cloud variant of this model from --control (repeatable)",
    )
    p.add_argument("--control", dest="control_url", metavar="URL", help="control plane base URL")
    p.add_argument(
        "--control-token",
        metavar="TOKEN",
        help="operator token (viewer) for --control (default: $FOGLINE_CONTROL_TOKEN)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("fogline-fallback-cache"),
        help="where fetched packages are kept (default %(default)s)",
    )
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
        default=300.0,
        help="while serving, fetch --control's keyring this often (default %(default)s)",
    )
    p.add_argument(
        "--token",
        dest="tokens",
        action="append",
        default=[],
        metavar="TOKEN",
        help="accepted bearer token (repeatable)",
    )
    p.add_argument(
        "--device-tokens",
        action="store_true",
        help="accept device tokens signed by a --trust-key (issued at enrollment)",
    )
    p.add_argument(
        "--tokens-file",
        type=Path,
        metavar="FILE",
        help="accepted bearer tokens, one a line ('#' comments)",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=64,
        help="concurrent infers before shedding load with 503 (default %(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY,
        help="largest infer request body; larger ones get 413 (default %(default)s)",
    )
    p.add_argument(
        "--body-timeout",
        dest="body_timeout_s",
        type=float,
        default=30.0,
        help="seconds a request body may take to arrive; then 408 (default %(default)s)",
    )
    p.add_argument(
        "--threads",
        dest="intra_op_threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads per model (default: one per core)",
    )
    add_batching_flags(p, "FOGLINE_FALLBACK")
    p.set_defaults(func=serve_command)


def settings_from_args(args: argparse.Namespace) -> FallbackSettings:
    tokens = set(args.tokens)
    if args.tokens_file is not None:
        tokens |= read_tokens(args.tokens_file)
    if args.max_inflight < 1:
        raise InvalidInputError("--max-inflight must be at least 1")
    if args.max_body_bytes < 1 or args.body_timeout_s <= 0:
        raise InvalidInputError("--max-body-bytes and --body-timeout must be positive")
    if not args.key_refresh_s > 0:
        raise InvalidInputError("--key-refresh-s must be positive")
    return FallbackSettings(
        batching=batch_settings_from_args(args),
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
    )


def read_tokens(path: Path) -> set[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InvalidInputError(f"cannot read tokens file: {exc}") from exc
    tokens = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    if not tokens:
        raise InvalidInputError(f"{path} holds no tokens")
    return tokens


def serve_command(args: argparse.Namespace) -> int:
    """``fogline fallback serve``: 0 after a clean shutdown, 2 when it cannot start."""
    try:
        asyncio.run(serve(settings_from_args(args)))
    except (FoglineError, OSError) as exc:  # bad package or signature, port taken, ...
        print(f"fogline fallback serve: error: {exc}", file=sys.stderr)
        return 2
    return 0
