"""The one runtime interface: ``load``, ``infer``, ``unload``.

ONNX Runtime, TensorRT and the cloud client implement it; the edge router is
a runtime that composes a local one and a remote one. Runtimes are async so
that blocking work (``session.run``, HTTP) never runs on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from common.errors import InvalidInputError
from common.inference import MODEL_VERSION, InferRequest, InferResponse, Tensor
from common.manifest import Manifest, TensorSpec

if TYPE_CHECKING:
    from common.serving_metrics import ServingMetrics


@dataclass(frozen=True)
class ModelInfo:
    """What a V2 ``GET /v2/models/{m}`` returns."""

    name: str
    version: str
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Runtime(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    @property
    def ready(self) -> bool: ...

    async def load(self) -> None: ...

    async def infer(self, request: InferRequest) -> InferResponse: ...

    async def unload(self) -> None: ...


@runtime_checkable
class VersionedRuntime(Runtime, Protocol):
    """A runtime that serves several versions of one model (``info``: the latest)."""

    def versions(self) -> list[str]: ...

    def runtime_for(self, version: str) -> Runtime | None: ...


class LocalRuntime(Runtime, Protocol):
    """A runtime of one package's model file in this process (ONNX Runtime, TensorRT).

    Beyond ``Runtime``: its manifest, where it records executions, and a blocking
    ``infer_sync`` on checked feeds, which the golden self-test runs before a slot
    is activated.
    """

    manifest: Manifest
    metrics: ServingMetrics | None

    def infer_sync(
        self, feeds: dict[str, np.ndarray], outputs: list[str] | None
    ) -> list[Tensor]: ...


def check_outputs(request: InferRequest, manifest: Manifest) -> None:
    """InvalidInputError for an output the package does not have (V2 ``outputs``)."""
    known = {o.name for o in manifest.outputs}
    if request.outputs is not None and not set(request.outputs) <= known:
        raise InvalidInputError(f"unknown output(s) {sorted(set(request.outputs) - known)}")


def package_answer(
    manifest: Manifest, request: InferRequest, outputs: list[Tensor]
) -> InferResponse:
    """The V2 answer of a package's model, named and versioned by its manifest."""
    return InferResponse(
        model=manifest.name,
        version=manifest.version,
        id=request.id,
        outputs=outputs,
        parameters={MODEL_VERSION: manifest.version},
    )


async def answer_locally(
    runtime: LocalRuntime,
    request: InferRequest,
    feeds: dict[str, np.ndarray],
    run: Callable[[], Awaitable[list[Tensor]]],
) -> InferResponse:
    """What every local runtime does around its run: refuse unknown outputs, time the
    run into ``runtime.metrics``, and answer with the package's name and version."""
    m = runtime.manifest
    check_outputs(request, m)
    start = time.perf_counter()
    outputs = await run()
    if runtime.metrics is not None:
        rows = next(iter(feeds.values())).shape[0] if feeds else 0
        runtime.metrics.observe_execution(
            m.name, m.version, rows, time.perf_counter() - start, [0.0]
        )
    return package_answer(m, request, outputs)
