"""Turning a package directory into a model the fallback may serve, and the keys it trusts.

A version is served only once its package verified (signature, then every
file's digest), its model loaded, and its golden self-test passed; until then
the version before it keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from pathlib import Path

from aiohttp import web

from cloud.fallback.settings import FallbackSettings
from cloud.package_cache import fetch_keyrings, fetch_revocations
from common.batch_settings import BatchSettings
from common.batcher import with_batching
from common.errors import AuthError, CloudUnavailableError, FoglineError, InvalidInputError
from common.golden import self_test
from common.inference import MODEL_VERSION, SERVED_BY, InferRequest, InferResponse
from common.keyring import apply_chain
from common.manifest import Manifest, read_package
from common.onnx_runtime import OnnxRuntime
from common.revocations import RevocationHolder
from common.runtime import ModelInfo, Runtime
from common.serving_metrics import ServingMetrics
from common.signing import TrustStore

logger = logging.getLogger(__name__)


class CloudServed:
    """A loaded version, serving: marks every answer as served by the cloud, and by
    which version, and counts requests in flight so retiring it never cuts one off."""

    def __init__(self, inner: Runtime, manifest: Manifest) -> None:
        self.inner = inner
        self.manifest = manifest
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def info(self) -> ModelInfo:
        return self.inner.info

    @property
    def release(self) -> int:
        return self.manifest.release

    @property
    def ready(self) -> bool:
        return self.inner.ready

    async def load(self) -> None:
        await self.inner.load()

    async def infer(self, request: InferRequest) -> InferResponse:
        # NOTE: counted before the first await, so a version taken out of service
        # between lookup and here is still waited for by ``retire``.
        self.inflight += 1
        self._idle.clear()
        try:
            response = await self.inner.infer(request)
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()
        response.parameters[SERVED_BY] = "cloud"
        response.parameters[MODEL_VERSION] = self.inner.info.version
        return response

    async def retire(self, timeout_s: float) -> None:
        """Unload once the requests in flight are answered (or after ``timeout_s``)."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        await self.unload()

    async def unload(self) -> None:
        await self.inner.unload()


def serving_runtime(
    runtime: OnnxRuntime,
    manifest: Manifest,
    batching: BatchSettings | None = None,
    metrics: ServingMetrics | None = None,
) -> CloudServed:
    """Wrap a loaded model for serving: batched unless ``batching`` is None (``load()``
    the result: a batched model calibrates there); executions counted in ``metrics``."""
    return CloudServed(with_batching(runtime, batching, metrics or ServingMetrics()), manifest)


async def load_package(
    directory: Path,
    trust: TrustStore | None,
    threads: int,
    batching: BatchSettings | None = None,
    metrics: ServingMetrics | None = None,
) -> CloudServed:
    """Verify one package (signature if ``trust``, every file's digest), load its model
    and run its golden self-test; the model is unloaded again if any step fails."""
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
    try:
        await self_test(runtime, directory, manifest)
    except BaseException:
        await runtime.unload()
        raise
    served = serving_runtime(runtime, manifest, batching, metrics)
    await served.load()  # batched: the calibration (the model itself is loaded)
    return served


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


async def refresh_revocations(settings: FallbackSettings, revoked: RevocationHolder) -> None:
    """Adopt the control plane's list of revoked devices; keep the one held on failure."""
    try:
        signed = await fetch_revocations(settings.control_url or "", settings.control_token)
        if revoked.offer(signed):
            logger.info(
                "revocation list %d: refusing %d devices' tokens",
                revoked.current.version,
                len(revoked.current.revoked),
            )
    except FoglineError as exc:
        logger.warning("device revocation list not refreshed: %s", exc)


def key_refresher(
    settings: FallbackSettings, trust: TrustStore, revoked: RevocationHolder | None = None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """While serving, apply new keyrings to ``trust`` in place, so a key revoked at the
    control plane stops authenticating device tokens here within ``key_refresh_s``, and
    versions loaded later are checked against the current keys; likewise the list of
    revoked devices (``revoked``), whose tokens are then refused."""

    async def refresh_forever() -> None:
        while True:
            await asyncio.sleep(settings.key_refresh_s)
            try:
                chain = await fetch_keyrings(settings.control_url or "", settings.control_token)
                new, applied = apply_chain(trust, chain, require_newer=False)
            except FoglineError as exc:
                logger.warning("keyring not refreshed: %s", exc)
            else:
                if applied:
                    trust.adopt(new)
                    logger.info("keyring %d: trusting %d keys", new.version, len(new.keys))
            if revoked is not None:
                await refresh_revocations(settings, revoked)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(refresh_forever(), name="fallback-key-refresh")
        yield
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    return ctx
