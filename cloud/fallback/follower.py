"""Keeps the repository in step with its source: polls, plans, loads, retires.

One sync at a time (a lock), so the periodic poll and an operator's load never
load the same version twice. A version that fails (signature, digest, load,
self-test) is remembered and not tried again until its package changes or an
operator asks for it; the version before it keeps serving. An unreachable
source is only logged: the next poll tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path

from aiohttp import web

from cloud.fallback.loading import CloudServed
from cloud.fallback.repository import Candidate, ModelRepository, plan_loads
from cloud.fallback.sources import ModelSource
from common.errors import (
    CloudUnavailableError,
    FoglineError,
    ModelNotFoundError,
    VerificationError,
)

logger = logging.getLogger(__name__)

Loader = Callable[[Path], Awaitable[CloudServed]]


class Follower:
    def __init__(
        self, repository: ModelRepository, source: ModelSource, loader: Loader, *, poll_s: float
    ) -> None:
        self.repository, self.source, self.loader = repository, source, loader
        self.poll_s = poll_s
        self.offered: list[Candidate] = []
        self.failed: dict[Candidate, str] = {}  # why each failed
        self.unloaded: set[str] = set()  # by an operator: not followed until loaded again
        self._lock = asyncio.Lock()

    async def sync(self, *, strict: bool = False, only: str | None = None) -> list[FoglineError]:
        """Load what the plan says. ``strict``: raise the first error (pinned start-up)."""
        async with self._lock:
            try:
                self.offered = await self.source.offers()
            except FoglineError as exc:
                if strict:
                    raise
                logger.warning("model source not read: %s", exc)
                return [exc]
            offered = set(self.offered)  # bounded: forget failures no longer offered
            self.failed = {c: why for c, why in self.failed.items() if c in offered}
            todo = plan_loads(
                self.offered,
                self.repository.loaded(),
                set(self.failed),
                self.unloaded,
                self.repository.keep,
            )
            errors = []
            for candidate in todo:
                if only is not None and candidate.name != only:
                    continue
                try:
                    await self._load(candidate)
                except FoglineError as exc:
                    if strict:
                        raise
                    errors.append(exc)
            return errors

    async def _load(self, c: Candidate) -> None:
        try:
            served = await self.loader(await self.source.fetch(c))
        except CloudUnavailableError as exc:  # passing: tried again at the next poll
            logger.warning("%s %s not fetched: %s", c.name, c.version, exc)
            raise
        except FoglineError as exc:
            self.failed[c] = str(exc)
            logger.warning(
                "%s %s refused, previous version keeps serving: %s", c.name, c.version, exc
            )
            raise
        m = served.manifest
        if (m.name, m.version) != (c.name, c.version):  # the package changed under us
            await served.unload()
            self.failed[c] = f"package holds {m.name} {m.version}"
            raise VerificationError(f"asked for {c.name} {c.version}, got {m.name} {m.version}")
        self.repository.install(served)

    async def load_model(self, name: str) -> CloudServed:
        """An operator's load: follow ``name`` again, retry its failed versions, load its
        latest now. Raises what stopped it; what was serving keeps serving."""
        self.unloaded.discard(name)
        for c in [c for c in self.failed if c.name == name]:
            del self.failed[c]
        errors = await self.sync(only=name)
        if errors:
            raise errors[0]
        model = self.repository.model(name)
        if model is None or model.latest is None:
            raise ModelNotFoundError(name)
        return model.latest

    def unload_model(self, name: str) -> None:
        """An operator's unload: stop serving ``name`` and stop following it."""
        known = any(c.name == name for c in self.offered)
        if not self.repository.unload(name) and not known:
            raise ModelNotFoundError(name)
        self.unloaded.add(name)

    def index(self) -> list[dict[str, object]]:
        """V2 repository index: loaded versions READY; the rest UNAVAILABLE, with why."""
        entries: list[dict[str, object]] = list(self.repository.index())
        loaded = self.repository.loaded()
        for c, why in sorted(self.failed.items(), key=lambda kv: (kv[0].name, kv[0].release)):
            entries.append(
                {"name": c.name, "version": c.version, "state": "UNAVAILABLE", "reason": why}
            )
        for name in sorted({c.name for c in self.offered} - set(loaded)):
            reason = "unloaded" if name in self.unloaded else "not loaded"
            entries.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
        return entries

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync()
            except Exception:  # a disk error, say: logged, and the next poll tries again
                logger.exception("model sync failed")

    def context(self) -> Callable[[web.Application], AsyncIterator[None]]:
        """An aiohttp cleanup context that polls while the app runs."""

        async def ctx(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(self.run(), name="fallback-follow")
            yield
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

        return ctx
