"""The one runtime interface: ``load``, ``infer``, ``unload``.

ONNX Runtime, TensorRT and the cloud client implement it; the edge router is
a runtime that composes a local one and a remote one. Runtimes are async so
that blocking work (``session.run``, HTTP) never runs on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from common.inference import InferRequest, InferResponse, Tensor
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
