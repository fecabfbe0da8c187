"""The fallback process: builds the V2 app over the repository, serves, drains.

On SIGTERM (Kubernetes stopping a pod) it drains: ``/v2/health/ready`` turns
503 so the Service stops sending, new infers get 503 + Retry-After (a client
retries on another replica), requests in flight are answered, then it exits.
``/v2/health/live`` stays 200 throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from importlib import metadata

from aiohttp import web

from cloud.fallback.follower import Follower
from cloud.fallback.loading import (
    key_refresher,
    load_package,
    refresh_revocations,
    trusted_keys,
)
from cloud.fallback.repository import ModelRepository
from cloud.fallback.repository_api import OperatorCheck, add_repository_routes
from cloud.fallback.settings import FallbackSettings, settings_from_args
from cloud.fallback.sources import make_source
from common.dataplane import DataPlane
from common.device_token import verify_token
from common.errors import AuthError, FoglineError, InvalidInputError
from common.request_body import RequestLimits
from common.revocations import RevocationHolder
from common.signing import TrustStore
from common.v2_server import V2_STATE, build_v2_app

logger = logging.getLogger(__name__)

SERVER_NAME = "fogline-fallback"
SHUTDOWN_TIMEOUT_S = 2.0
FALLBACK_REPOSITORY = web.AppKey("fogline.fallback.repository", ModelRepository)


async def build_fallback_app(settings: FallbackSettings) -> web.Application:
    """Load what the settings name (pinned: every package, or an error; following:
    whatever the source offers now), then the V2 app serving it, which keeps following."""
    trust = await trusted_keys(settings)  # before any fetch: it verifies what it fetches
    if trust is None:
        logger.warning("no trusted keys: package signatures are not checked, only digests")
    if settings.device_tokens and trust is None:
        raise InvalidInputError("device tokens need --trust-key (the keys that sign them)")
    if not settings.following and not (settings.packages or settings.models):
        raise InvalidInputError("no packages to serve: give --package, --model or --control")
    dataplane = DataPlane(SERVER_NAME, _version())
    repository = ModelRepository(
        dataplane, keep=settings.keep_versions, retire_timeout_s=settings.drain_timeout_s
    )
    loader = functools.partial(
        load_package,
        trust=trust,
        threads=settings.intra_op_threads,
        batching=settings.batching,
        metrics=dataplane.metrics,
    )
    follower = Follower(repository, make_source(settings, trust), loader, poll_s=settings.poll_s)
    try:
        await follower.sync(strict=not settings.following)
    except BaseException:
        await repository.close()
        raise
    operators = OperatorCheck(
        settings.control_url, settings.admin_tokens, ttl_s=settings.operator_cache_s
    )
    # Device tokens are checked offline; revoked devices arrive as a signed list.
    revoked = RevocationHolder(trust) if trust is not None and settings.device_tokens else None
    if revoked is not None and settings.control_url and settings.refresh_keys:
        await refresh_revocations(settings, revoked)
    app = build_v2_app(
        dataplane,
        auth_tokens=_static_tokens(settings),
        token_verifier=_token_verifier(settings, trust, operators, revoked),
        max_inflight=settings.max_inflight,
        limits=RequestLimits(
            max_body=settings.max_body_bytes,
            body_timeout_s=settings.body_timeout_s,
            decode_budget=2 * settings.max_body_bytes,
        ),
    )
    add_repository_routes(app, follower, operators)
    app[FALLBACK_REPOSITORY] = repository
    app.on_cleanup.append(lambda app: repository.close())
    if trust is not None and settings.control_url and settings.refresh_keys:
        app.cleanup_ctx.append(key_refresher(settings, trust, revoked))
    if settings.following:
        app.cleanup_ctx.append(follower.context())
    return app


def _static_tokens(settings: FallbackSettings) -> set[str] | None:
    """Accepted bearer tokens; None (no auth) only when nothing at all is configured."""
    if settings.tokens is None and not settings.device_tokens:
        return None  # open: admin secrets must not close it as a side effect
    return (settings.tokens or set()) | settings.admin_tokens


def _token_verifier(
    settings: FallbackSettings,
    trust: TrustStore | None,
    operators: OperatorCheck,
    revoked: RevocationHolder | None,
) -> Callable[[str], Awaitable[None]] | None:
    """Tokens past the static ones: device tokens (offline, unless their device was
    revoked) and operator tokens (the control plane, cached)."""
    if _static_tokens(settings) is None:
        return None

    async def verify(token: str) -> None:
        if operators.is_operator_token(token):
            await operators.role(token)
        elif trust is not None and revoked is not None:
            claims = verify_token(trust, token)
            if revoked.refuses(claims):
                raise AuthError(f"device {claims.device_id!r} was revoked")
        else:
            raise AuthError("invalid bearer token")

    return verify


def _version() -> str:
    try:
        return metadata.version("fogline")
    except metadata.PackageNotFoundError:
        return "0+unknown"


async def serve(settings: FallbackSettings) -> None:
    """Run the fallback server until SIGINT or SIGTERM, then drain and stop."""
    app = await build_fallback_app(settings)
    if settings.tokens is None and not settings.device_tokens:
        logger.warning("no tokens: the fallback API accepts any caller")
    # Per-request access lines only at DEBUG (STYLE: state changes at INFO, requests at DEBUG).
    access_log = logging.getLogger("aiohttp.access") if logger.isEnabledFor(logging.DEBUG) else None
    # NOTE: infers are drained before cleanup (``drain``); what aiohttp then waits for
    # is connections that never sent a request, which need not hold up the exit.
    runner = web.AppRunner(app, access_log=access_log, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        host, port = runner.addresses[0][:2]
        names = ", ".join(app[V2_STATE].dataplane.names()) or "nothing yet"
        logger.info("fallback serving %s at http://%s:%s/v2", names, host, port)
        await _until_signalled()
        await drain(app, settings.drain_timeout_s)
        logger.info("fallback shutting down")
    finally:
        await runner.cleanup()


async def drain(app: web.Application, timeout_s: float) -> None:
    """Not ready, refuse new infers, and wait (at most ``timeout_s``) for those in flight."""
    state = app[V2_STATE]
    state.dataplane.drain()
    deadline = time.monotonic() + timeout_s
    while state.gate.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if state.gate.inflight:
        logger.warning(
            "drain: %d requests still in flight after %.0f s", state.gate.inflight, timeout_s
        )


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


def serve_command(args: argparse.Namespace) -> int:
    """``fogline fallback serve``: 0 after a clean shutdown, 2 when it cannot start."""
    try:
        asyncio.run(serve(settings_from_args(args)))
    except (FoglineError, OSError) as exc:  # bad package or signature, port taken, ...
        print(f"fogline fallback serve: error: {exc}", file=sys.stderr)
        return 2
    return 0
