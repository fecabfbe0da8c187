"""Which versions of which models the fallback serves, and the decision what to load.

``ModelVersions`` is one model's entry in the DataPlane: it answers with the
latest loaded version and still serves each older one still loaded by number.
``ModelRepository`` installs a version (already verified, loaded and
self-tested), then retires the versions past the latest N, each only once its
requests in flight are answered. ``plan_loads`` is the pure decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cloud.fallback.loading import CloudServed
from common.dataplane import DataPlane
from common.errors import ModelNotReadyError
from common.inference import InferRequest, InferResponse
from common.runtime import ModelInfo, Runtime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A version a source offers. Its word only, unverified: a hint of what to fetch."""

    name: str  # checked by common.names
    version: str  # checked by common.names
    release: int
    key: str  # changes when the package does: the artifact digest, or the files' mtimes


def plan_loads(
    offered: list[Candidate],
    loaded: dict[str, set[str]],
    failed: set[Candidate],
    skip: set[str],
    keep: int,
) -> list[Candidate]:
    """The versions to load now, newest first for each model: of the ``keep`` newest
    offered versions that have not failed, those not loaded yet. A model in ``skip``
    (unloaded by an operator) is left alone. A failed version is skipped, so the
    version before it stays the latest served."""
    by_model: dict[str, dict[str, Candidate]] = {}
    for c in offered:
        by_model.setdefault(c.name, {}).setdefault(c.version, c)
    todo = []
    for name in sorted(by_model):
        if name in skip:
            continue
        good = [c for c in by_model[name].values() if c not in failed]
        newest = sorted(good, key=lambda c: c.release, reverse=True)[:keep]
        todo += [c for c in newest if c.version not in loaded.get(name, set())]
    return todo


class ModelVersions:
    """One model's loaded versions, as one runtime: ``info`` and plain infers are the
    latest release's; ``runtime_for`` serves any other version still loaded."""

    def __init__(self, name: str) -> None:
        self.name = name
        # NOTE: replaced, never mutated, as DataPlane's map: a request sees a whole one.
        self._versions: dict[str, CloudServed] = {}
        self._latest: CloudServed | None = None

    @property
    def latest(self) -> CloudServed | None:
        return self._latest

    @property
    def info(self) -> ModelInfo:
        if self._latest is None:
            raise ModelNotReadyError(f"model {self.name!r} has no version loaded")
        return self._latest.info

    @property
    def ready(self) -> bool:
        return self._latest is not None and self._latest.ready

    def versions(self) -> list[str]:
        """Loaded versions, latest release first."""
        ordered = sorted(self._versions.values(), key=lambda s: s.release, reverse=True)
        return [s.info.version for s in ordered]

    def runtime_for(self, version: str) -> Runtime | None:
        return self._versions.get(version)

    def served(self) -> list[CloudServed]:
        return list(self._versions.values())

    def add(self, served: CloudServed) -> CloudServed | None:
        """Serve ``served``; returns the runtime it replaced (same version), if any."""
        old = self._versions.get(served.info.version)
        self._versions = {**self._versions, served.info.version: served}
        self._pick_latest()
        return old

    def remove(self, version: str) -> CloudServed | None:
        versions = dict(self._versions)
        removed = versions.pop(version, None)
        self._versions = versions
        self._pick_latest()
        return removed

    def _pick_latest(self) -> None:
        ordered = sorted(self._versions.values(), key=lambda s: s.release)
        self._latest = ordered[-1] if ordered else None

    async def load(self) -> None:
        return None  # each version is loaded before it is added

    async def infer(self, request: InferRequest) -> InferResponse:
        latest = self._latest
        if latest is None:
            raise ModelNotReadyError(f"model {self.name!r} has no version loaded")
        return await latest.infer(request)

    async def unload(self) -> None:
        for served in self.served():
            await served.unload()


class ModelRepository:
    """The models the fallback serves, each with its latest ``keep`` versions."""

    def __init__(self, dataplane: DataPlane, *, keep: int, retire_timeout_s: float) -> None:
        self.dataplane = dataplane
        self.keep = keep
        self.retire_timeout_s = retire_timeout_s
        self._models: dict[str, ModelVersions] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def __iter__(self) -> Iterator[CloudServed]:
        for model in list(self._models.values()):
            yield from model.served()

    def loaded(self) -> dict[str, set[str]]:
        return {name: set(m.versions()) for name, m in self._models.items()}

    def model(self, name: str) -> ModelVersions | None:
        return self._models.get(name)

    def install(self, served: CloudServed) -> None:
        """Serve a verified, loaded, self-tested version; retire those past the latest N."""
        name = served.info.name
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = ModelVersions(name)
        replaced = model.add(served)
        if not self.dataplane.has(name):
            self.dataplane.register(model)
        logger.info("model %s: serving version %s", name, served.info.version)
        if replaced is not None and replaced is not served:
            self._retire(replaced)
        for version in model.versions()[self.keep :]:
            if (old := model.remove(version)) is not None:
                logger.info("model %s: version %s retired (keeping %d)", name, version, self.keep)
                self._retire(old)

    def unload(self, name: str) -> bool:
        """Stop serving every version of ``name``; False if none was loaded."""
        model = self._models.pop(name, None)
        if model is None:
            return False
        self.dataplane.unregister(name)
        for served in model.served():
            self._retire(served)
        return True

    def _retire(self, served: CloudServed) -> None:
        task = asyncio.create_task(served.retire(self.retire_timeout_s), name="fallback-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def index(self) -> list[dict[str, Any]]:
        """The V2 repository index entries of the loaded versions."""
        return [
            {"name": name, "version": version, "state": "READY", "reason": ""}
            for name, model in sorted(self._models.items())
            for version in model.versions()
        ]

    async def close(self) -> None:
        """Unload everything (at shutdown: no request is in flight any more)."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for name in list(self._models):
            model = self._models.pop(name)
            self.dataplane.unregister(name)
            await model.unload()
