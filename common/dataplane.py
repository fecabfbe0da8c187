"""The transport-neutral V2 service (MLServer's ``DataPlane``): a registry of runtimes.

HTTP handlers (``common.v2_server``) parse and map status codes; everything
they decide about models happens here.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client.core import Metric

from common.errors import ModelNotFoundError, ModelNotReadyError, OverloadedError
from common.inference import InferRequest, InferResponse
from common.manifest import TensorSpec
from common.runtime import Runtime, VersionedRuntime
from common.serving_metrics import ServingMetrics, loaded_versions

logger = logging.getLogger(__name__)


class DataPlane:
    """Transport-neutral V2 service: a registry of runtimes by model name."""

    def __init__(self, server_name: str, server_version: str) -> None:
        self.server_name = server_name
        self.server_version = server_version
        # NOTE: the map is replaced, never mutated, so a request always sees a whole map.
        self._runtimes: dict[str, Runtime] = {}
        self.draining = False  # set once, on shutdown: not ready, infers refused with 503
        # One registry per server: what its /metrics shows, and what its batchers record.
        self.metrics = ServingMetrics()
        self.metrics.add_collector("loaded", self._loaded)

    def _loaded(self) -> list[Metric]:
        pairs = []
        for r in self._runtimes.values():
            versions = r.versions() if isinstance(r, VersionedRuntime) else [r.info.version]
            pairs += [(r.info.name, v) for v in versions]
        return [loaded_versions(pairs)]

    def register(self, runtime: Runtime) -> None:
        """Serve ``runtime`` under its ``info.name``, replacing any runtime of that name."""
        info = runtime.info
        self._runtimes = {**self._runtimes, info.name: runtime}
        logger.info("serving model %s version %s", info.name, info.version)

    def unregister(self, name: str) -> Runtime | None:
        runtimes = dict(self._runtimes)
        removed = runtimes.pop(name, None)
        self._runtimes = runtimes
        if removed is not None:
            logger.info("stopped serving model %s", name)
        return removed

    def names(self) -> list[str]:
        return sorted(self._runtimes)

    def has(self, name: str) -> bool:
        return name in self._runtimes

    def get(self, name: str, version: str | None = None) -> Runtime:
        runtime: Runtime | None = self._runtimes.get(name)
        if runtime is not None and version is not None and version != runtime.info.version:
            # A runtime that holds several versions (the fallback's) may still serve it.
            if isinstance(runtime, VersionedRuntime):
                runtime = runtime.runtime_for(version)
            else:
                runtime = None
        if runtime is None:
            raise ModelNotFoundError(name, version)
        return runtime

    def drain(self) -> None:
        """Stop taking work (shutdown): readiness goes false, new infers get 503."""
        self.draining = True
        logger.info("draining: not ready, refusing new requests")

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        runtimes = list(self._runtimes.values())
        return not self.draining and bool(runtimes) and all(r.ready for r in runtimes)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.get(name, version).ready

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": self.server_name,
            "version": self.server_version,
            "extensions": ["binary_tensor_data"],
        }

    def model_index(self) -> list[dict[str, Any]]:
        """``GET /v2/models``: every served model, its version and whether it is ready."""
        return [
            {"name": name, "versions": [r.info.version] if r.info.version else [], "ready": r.ready}
            for name, r in sorted(self._runtimes.items())
        ]

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        info = self.get(name, version).info
        top = self._runtimes[name]
        versions = top.versions() if isinstance(top, VersionedRuntime) else [info.version]
        doc: dict[str, Any] = {
            "name": info.name,
            "versions": versions,
            "platform": info.platform,
            "inputs": [_spec_to_rest(s) for s in info.inputs],
            "outputs": [_spec_to_rest(s) for s in info.outputs],
        }
        if info.parameters:
            doc["parameters"] = info.parameters
        return doc

    async def infer(self, request: InferRequest) -> InferResponse:
        if self.draining:
            raise OverloadedError("server is shutting down: retry on another replica")
        runtime = self.get(request.model, request.version)
        if not runtime.ready:
            raise ModelNotReadyError(f"model {request.model!r} is not ready")
        return await runtime.infer(request)


def _spec_to_rest(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}
