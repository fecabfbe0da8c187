"""ONNX Runtime backend of the runtime interface.

It lives in common/ because both the edge agent and the cloud fallback serve
ONNX models and neither may import the other; it imports onnxruntime lazily
so that the wire formats in common/ do not need it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InvalidInputError, ModelNotReadyError
from common.inference import (
    V2_TO_NUMPY,
    InferRequest,
    InferResponse,
    Tensor,
)
from common.manifest import Manifest, TensorSpec
from common.runtime import ModelInfo, answer_locally
from common.serving_metrics import ServingMetrics
from common.text import (
    TEXT_INPUT,
    TOKENIZER_ROLE,
    TextEncoder,
    check_token_feeds,
    has_text_input,
    text_feeds,
)

logger = logging.getLogger(__name__)

# NOTE: an exception to "blocking work runs off the event loop", measured in
# bench.edge: for a model whose session.run takes tens of microseconds, the hop
# to a worker thread costs more than the run itself (about 90 us of a 550 us
# request). Models whose typical run is below this bound run inline; the loop
# is blocked for less than aiohttp spends parsing the request. Anything slower
# (and every first run, before it is measured) goes to a worker thread.
INLINE_BELOW_US = 200.0
DEFAULT_MAX_TOKENS = 512  # a tokenizer's limit when the manifest does not give one
_TOKENIZE_INLINE_BYTES = 16 * 1024  # more text than this is tokenised off the event loop

# ONNX element types (as ONNX Runtime names them) -> V2 datatypes: every type
# the V2 codec has a NumPy dtype for. Others (string, bfloat16, ...) are refused.
_ORT_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint64)": "UINT64",
    "tensor(uint32)": "UINT32",
    "tensor(uint16)": "UINT16",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}


def check_inputs(request: InferRequest, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Match request tensors to the model's signature; raise InvalidInputError on mismatch."""
    by_name = {t.name: t for t in request.inputs}
    unknown = set(by_name) - {s.name for s in specs}
    if unknown:
        raise InvalidInputError(f"model {request.model!r} has no input(s) {sorted(unknown)}")
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        t = by_name.get(spec.name)
        if t is None:
            raise InvalidInputError(f"model {request.model!r} needs input {spec.name!r}")
        if t.datatype != spec.datatype:
            raise InvalidInputError(
                f"input {spec.name!r} must be {spec.datatype}, got {t.datatype}"
            )
        if len(t.shape) != len(spec.shape) or any(
            want != -1 and want != got for want, got in zip(spec.shape, t.shape, strict=True)
        ):
            raise InvalidInputError(
                f"input {spec.name!r} must have shape {spec.shape}, got {t.shape}"
            )
        feeds[spec.name] = np.ascontiguousarray(t.data, dtype=V2_TO_NUMPY[spec.datatype])
    return feeds


class OnnxRuntime:
    """Serves one ONNX model file described by a manifest.

    ``session.run`` releases the GIL, so it runs in a worker thread and the
    event loop stays free for other requests.
    """

    platform = "onnxruntime_onnx"

    def __init__(
        self,
        model_path: Path,
        manifest: Manifest,
        *,
        intra_op_threads: int = 1,
        providers: list[str] | None = None,
        inline_below_us: float = INLINE_BELOW_US,
        spinning: bool = True,
    ) -> None:
        self.model_path = model_path
        self.manifest = manifest
        self._threads = intra_op_threads
        self._spinning = spinning
        self._providers = providers or ["CPUExecutionProvider"]
        self._session: Any = None
        self._encoder: TextEncoder | None = None
        self._inline_below_us = inline_below_us
        self._ewma_us: float | None = None  # typical session.run time, measured
        # Where ``infer`` records each execution (a BatchingRuntime records its own).
        self.metrics: ServingMetrics | None = None
        self._info: tuple[Manifest, ModelInfo] | None = None

    @property
    def info(self) -> ModelInfo:
        # Built once per manifest: every request reads it (metric labels, the answer).
        cached = self._info
        if cached is not None and cached[0] is self.manifest:
            return cached[1]
        m = self.manifest
        info = ModelInfo(
            name=m.name,
            version=m.version,
            platform=self.platform,
            inputs=m.inputs,
            outputs=m.outputs,
            parameters=self._parameters(),
        )
        self._info = (m, info)
        return info

    def _parameters(self) -> dict[str, Any]:
        m = self.manifest
        params: dict[str, Any] = {"fogline.variant": m.variant, "fogline.precision": m.precision}
        if m.has_file(TOKENIZER_ROLE):
            params["fogline.text_input"] = TEXT_INPUT  # BYTES [rows], tokenised here
        if m.routing.max_sequence_length is not None:
            params["fogline.max_sequence_length"] = m.routing.max_sequence_length
        return params

    @property
    def ready(self) -> bool:
        return self._session is not None

    def _open(self) -> Any:
        session = open_session(
            self.model_path,
            threads=self._threads,
            providers=self._providers,
            spinning=self._spinning,
        )
        declared = {s.name for s in self.manifest.inputs}
        actual = {i.name for i in session.get_inputs()}
        if declared != actual:
            raise InvalidInputError(
                f"{self.model_path.name}: manifest inputs {sorted(declared)} "
                f"but the model has {sorted(actual)}"
            )
        if self.manifest.has_file(TOKENIZER_ROLE):
            name = self.manifest.file(TOKENIZER_ROLE).name
            limit = self.manifest.routing.max_sequence_length or DEFAULT_MAX_TOKENS
            self._encoder = TextEncoder(self.model_path.parent / name, limit)
        return session

    async def load(self) -> None:
        if self._session is None:
            self._session = await asyncio.to_thread(self._open)
            logger.info(
                "loaded %s %s from %s", self.manifest.name, self.manifest.version, self.model_path
            )

    def infer_sync(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> list[Tensor]:
        session = self._session
        if session is None:
            raise ModelNotReadyError(f"model {self.manifest.name!r} is not loaded")
        names = outputs or [o.name for o in self.manifest.outputs]
        start = time.perf_counter_ns()
        results = session.run(names, feeds)
        took_us = (time.perf_counter_ns() - start) / 1000.0
        ewma = self._ewma_us
        self._ewma_us = took_us if ewma is None else 0.9 * ewma + 0.1 * took_us
        return [Tensor(n, np.asarray(r)) for n, r in zip(names, results, strict=True)]

    @property
    def runs_inline(self) -> bool:
        """Whether ``infer`` calls ``session.run`` on the event loop (see INLINE_BELOW_US)."""
        ewma = self._ewma_us
        return ewma is not None and ewma < self._inline_below_us

    def _feeds(self, request: InferRequest) -> dict[str, np.ndarray]:
        specs = self.manifest.inputs
        if has_text_input(request.inputs):
            return text_feeds(self._encoder, request.inputs, [s.name for s in specs], request.model)
        feeds = check_inputs(request, specs)
        encoder = self._encoder
        limit = self.manifest.routing.max_sequence_length
        if encoder is not None or limit is not None:
            check_token_feeds(feeds, limit, encoder.vocab_size if encoder else None)
        return feeds

    async def request_feeds(self, request: InferRequest) -> dict[str, np.ndarray]:
        """The model's feeds for ``request``, checked (tokenized first when it holds text,
        off the loop when that is long); the batcher builds its rows with this too."""
        if _text_size(request) > _TOKENIZE_INLINE_BYTES:
            return await asyncio.to_thread(self._feeds, request)
        return self._feeds(request)

    async def infer(self, request: InferRequest) -> InferResponse:
        feeds = await self.request_feeds(request)

        async def run() -> list[Tensor]:
            if self.runs_inline:
                return self.infer_sync(feeds, request.outputs)
            return await asyncio.to_thread(self.infer_sync, feeds, request.outputs)

        return await answer_locally(self, request, feeds, run)

    async def unload(self) -> None:
        self._session = None
        self._encoder = None


def _text_size(request: InferRequest) -> int:
    return sum(
        len(b) if isinstance(b, bytes) else 0
        for t in request.inputs
        if t.data.dtype == object
        for b in t.data.reshape(-1)
    )


def open_session(
    model_path: Path,
    *,
    threads: int = 1,
    providers: list[str] | None = None,
    spinning: bool = True,
) -> Any:
    """An ONNX Runtime session with a fixed thread count: the one way Fogline opens one.

    ``spinning=False``: idle intra-op threads sleep instead of busy-waiting for the
    next parallel section. For a server whose event loop and concurrent runs share
    the cores (on a busy 2-core host the spinning threads burnt about two thirds of
    the fallback's CPU time on digits, measured with bench.fallback's model).
    """
    import onnxruntime as ort  # lazy: heavy, and not needed by the wire formats

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # NOTE: no CPU arena: it keeps the largest batch's memory forever (and grows with
    # each new batch size); plain malloc/free gives it back after a large request.
    opts.enable_cpu_mem_arena = False
    return ort.InferenceSession(
        str(model_path), opts, providers=providers or ["CPUExecutionProvider"]
    )


def describe_onnx_io(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Read a model's input/output signature, for building a manifest."""
    session = open_session(model_path)

    def spec(arg: Any) -> TensorSpec:
        shape = [d if isinstance(d, int) else -1 for d in arg.shape]
        datatype = _ORT_TO_V2.get(arg.type)
        if datatype is None:
            raise InvalidInputError(
                f"{model_path.name}: {arg.name!r} has type {arg.type}, which Fogline cannot serve"
            )
        return TensorSpec(arg.name, datatype, shape)

    return [spec(i) for i in session.get_inputs()], [spec(o) for o in session.get_outputs()]
