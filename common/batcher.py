"""Dynamic batching: a Runtime around an ``OnnxRuntime`` that merges concurrent requests.

Why: on a compute-bound model one execution of 16 rows costs far less than 16
of one row. Requests are checked one by one (a bad one is refused alone),
queued, merged in arrival order with those of the same shape (token inputs
with an ``attention_mask`` are padded to the longest instead), run once off the
event loop, and split back. If a merged run fails, each request runs alone, so
one bad request never fails its batch-mates. While a batch runs the next one
gathers, so under load batches form without waiting; the queue delay is only
spent when the last batch was larger than one (traffic is concurrent).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field, replace

import numpy as np

from common.batch_calibration import Calibration, calibrate
from common.batch_settings import DEFAULT_MAX_BATCH, BatchSettings, deadline_ms
from common.errors import (
    DeadlineExceededError,
    FoglineError,
    InvalidInputError,
    ModelNotReadyError,
)
from common.golden import load_golden
from common.inference import InferRequest, InferResponse, Tensor
from common.onnx_runtime import INLINE_BELOW_US, OnnxRuntime
from common.runtime import ModelInfo, check_outputs, package_answer
from common.serving_metrics import ServingMetrics

logger = logging.getLogger(__name__)

MASK_INPUT = "attention_mask"
# Executions in flight per model: a model that does not fill the cores at its best
# batch size (MiniLM on 2 cores: two batch-1 runs beat one batch-16 run) shares them.
WORKERS = 2


@dataclass
class _Item:
    feeds: dict[str, np.ndarray]
    outputs: list[str] | None
    rows: int
    length: int  # sequence length (padded models), else 0
    key: Hashable
    enqueued: float
    deadline: float | None
    future: asyncio.Future[list[Tensor]] = field(repr=False)


class BatchingRuntime:
    """Serves ``inner`` with dynamic batching; the same ``Runtime`` interface."""

    def __init__(
        self,
        inner: OnnxRuntime,
        settings: BatchSettings | None = None,
        *,
        metrics: ServingMetrics | None = None,
        example: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.inner = inner
        self.settings = settings or BatchSettings()
        if self.settings.max_batch < 1:
            raise InvalidInputError("a batching runtime needs a max batch of at least 1")
        self.metrics = metrics
        self._example = example
        specs = inner.manifest.inputs
        names = {s.name for s in specs}
        # Token models: every input [batch, seq] of integers and a mask: pad with 0s.
        self.pads = MASK_INPUT in names and all(
            len(s.shape) == 2 and s.shape[1] == -1 and s.datatype in ("INT64", "INT32")
            for s in specs
        )
        self.preferred = self.settings.max_batch
        self.cap = self.settings.max_batch  # rows per run; calibrated: the best size
        self.delay_s = self.settings.max_delay_us / 1e6
        self.calibration: Calibration | None = None
        self._cost_s: dict[int, float] = {}  # measured compute time by batch size
        self._queue: deque[_Item] = deque()
        self._wake: asyncio.Event | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._busy_until = 0.0
        self._last_rows = 1
        self._info: tuple[ModelInfo, ModelInfo] | None = None  # (inner's, ours)

    # --- Runtime interface --------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        # Cached: read several times per request; what it shows changes only at load.
        base = self.inner.info
        cached = self._info
        if cached is not None and cached[0] is base:
            return cached[1]
        info = self._describe(base)
        self._info = (base, info)
        return info

    def _describe(self, info: ModelInfo) -> ModelInfo:
        params = dict(info.parameters)
        params["fogline.batching.max_batch"] = self.settings.max_batch
        params["fogline.batching.preferred_batch"] = self.preferred
        params["fogline.batching.batch_cap"] = self.cap
        params["fogline.batching.max_queue_delay_us"] = round(self.delay_s * 1e6, 1)
        params["fogline.batching.pads_sequences"] = self.pads
        if self.calibration is not None:
            params["fogline.batching.calibration"] = self.calibration.as_dict()
        return replace(info, parameters=params)

    @property
    def ready(self) -> bool:
        return self.inner.ready

    async def load(self) -> None:
        await self.inner.load()
        if self.settings.calibrate and self.settings.max_batch > 1:
            example = self._example or self._golden_example() or self._synthetic_example()
            self.calibration = await asyncio.to_thread(
                calibrate, self.inner, example, self.settings.max_batch, self.settings.calibration_s
            )
            self.preferred = self.calibration.preferred
            self.cap = self.calibration.best
            self._cost_s.update(self.calibration.seconds)
            # Wait at most one preferred batch's compute time for batch-mates.
            self.delay_s = min(self.delay_s, self.calibration.seconds[self.preferred])
            self._info = None
            logger.info(
                "%s %s: preferred batch %d, queue delay %.0f us (%s)",
                self.inner.manifest.name,
                self.inner.manifest.version,
                self.preferred,
                self.delay_s * 1e6,
                self.calibration.summary(),
            )

    async def unload(self) -> None:
        for task in self._workers:
            task.cancel()
        self._workers = []
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(ModelNotReadyError("model unloaded"))
        await self.inner.unload()

    async def infer(self, request: InferRequest) -> InferResponse:
        manifest = self.inner.manifest
        if not self.inner.ready:
            raise ModelNotReadyError(f"model {manifest.name!r} is not loaded")
        feeds = await self.inner.request_feeds(request)  # text is tokenized here
        check_outputs(request, manifest)
        budget_ms = deadline_ms(request)
        now = time.perf_counter()
        item = self._item(feeds, request.outputs, now, budget_ms)
        if item.deadline is not None and now + self._expected_wait(item.rows) > item.deadline:
            raise DeadlineExceededError(
                f"deadline of {budget_ms} ms cannot be met: the queue needs longer"
            )
        self._queue.append(item)
        self._ensure_worker().set()
        return package_answer(manifest, request, await item.future)

    # --- queue --------------------------------------------------------------------------

    def _item(
        self,
        feeds: dict[str, np.ndarray],
        outputs: list[str] | None,
        now: float,
        budget_ms: float | None,
    ) -> _Item:
        rows = next(iter(feeds.values())).shape[0] if feeds else 0
        if any(a.shape[0] != rows for a in feeds.values()):
            raise InvalidInputError("all inputs must have the same number of rows")
        length = 0
        if self.pads:
            lengths = {a.shape[1] for a in feeds.values()}
            if len(lengths) != 1:
                raise InvalidInputError("token inputs must all have the same sequence length")
            length = lengths.pop()
            shape_key: Hashable = ()
        else:
            shape_key = tuple((n, a.shape[1:]) for n, a in sorted(feeds.items()))
        key = (shape_key, tuple(outputs) if outputs is not None else None)
        deadline = None if budget_ms is None else now + budget_ms / 1000.0
        future = asyncio.get_running_loop().create_future()
        return _Item(feeds, outputs, rows, length, key, now, deadline, future)

    def _ensure_worker(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        workers = self._workers
        if not workers or any(t.done() or t.get_loop() is not loop for t in workers):
            for task in workers:
                task.cancel()
            self._wake = asyncio.Event()
            name = f"batcher-{self.inner.info.name}"
            self._workers = [loop.create_task(self._work(), name=name) for _ in range(WORKERS)]
        assert self._wake is not None
        return self._wake

    def _cost(self, rows: int) -> float:
        """Expected compute seconds for ``rows`` rows (0 until measured)."""
        if not self._cost_s:
            return 0.0
        sizes = sorted(self._cost_s)
        above = [s for s in sizes if s >= rows]
        size = above[0] if above else sizes[-1]
        return self._cost_s[size] * (rows / size if rows > size else 1.0)

    def _expected_wait(self, rows: int) -> float:
        queued = sum(i.rows for i in self._queue) + rows
        batches = math.ceil(queued / self.settings.max_batch)
        running = max(0.0, self._busy_until - time.perf_counter())
        return running + batches * self._cost(min(queued, self.settings.max_batch))

    async def _work(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            if not self._queue:
                wake.clear()
                await wake.wait()
                continue
            if self._last_rows > 1 and self.delay_s > 0:
                await self._gather(wake)
                if not self._queue:  # another worker took them while this one waited
                    continue
            batch = self._drop_late(self._take())
            if batch:
                await self._run(batch)
            # NOTE: let go of the requests (their inputs and answers) while idle: a large
            # request's memory is given back after its answer (common.memory) only once
            # nothing holds it.
            del batch

    async def _gather(self, wake: asyncio.Event) -> None:
        """Wait up to the queue delay for a preferred batch of the first request's shape."""
        end = self._queue[0].enqueued + self.delay_s
        while self._queue:
            key = self._queue[0].key
            rows = sum(i.rows for i in self._queue if i.key == key)
            left = end - time.perf_counter()
            if rows >= self.preferred or left <= 0:
                return
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[_Item]:
        """The oldest request and, in order, the queued ones that can share its run."""
        first = self._queue.popleft()
        batch, rows, kept = [first], first.rows, deque[_Item]()
        while self._queue:
            item = self._queue.popleft()
            if item.key == first.key and rows + item.rows <= self.cap:
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
        self._queue = kept
        return batch

    def _drop_late(self, batch: list[_Item]) -> list[_Item]:
        """Refuse (503) the requests whose deadline falls before this batch would end."""
        finish = time.perf_counter() + self._cost(sum(i.rows for i in batch))
        kept = []
        for item in batch:
            if item.future.done():  # the caller went away
                continue
            if item.deadline is not None and finish > item.deadline:
                item.future.set_exception(
                    DeadlineExceededError("deadline cannot be met: refused before running")
                )
            else:
                kept.append(item)
        return kept

    # --- execution ----------------------------------------------------------------------

    async def _run(self, batch: list[_Item]) -> None:
        rows = sum(i.rows for i in batch)
        feeds = self._merge(batch)
        started = time.perf_counter()
        self._busy_until = started + self._cost(rows)
        try:
            outputs = batch[0].outputs
            if 0 < self._cost(rows) * 1e6 < INLINE_BELOW_US:  # see onnx_runtime's NOTE
                results, took = self._timed(feeds, outputs)
            else:
                results, took = await asyncio.to_thread(self._timed, feeds, outputs)
            parts = self._split(batch, results)
        except asyncio.CancelledError:  # unloaded mid-run: nobody may wait forever
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(ModelNotReadyError("model unloaded"))
            raise
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0], exc)
            else:  # isolate the bad request: each runs alone
                logger.debug("batch of %d failed (%s): running each alone", len(batch), exc)
                for item in batch:
                    await self._run([item])
            return
        finally:
            self._busy_until = 0.0
        self._last_rows = rows
        old = self._cost_s.get(rows)
        self._cost_s[rows] = took if old is None else 0.8 * old + 0.2 * took
        self._record(batch, rows, started, took)
        for item, part in zip(batch, parts, strict=True):
            if not item.future.done():
                item.future.set_result(part)

    def _timed(
        self, feeds: dict[str, np.ndarray], outputs: list[str] | None
    ) -> tuple[list[Tensor], float]:
        """The run and its own duration: the thread hop is not the model's cost."""
        start = time.perf_counter()
        results = self.inner.infer_sync(feeds, outputs)
        return results, time.perf_counter() - start

    def _fail(self, item: _Item, exc: Exception) -> None:
        if item.future.done():
            return
        if not isinstance(exc, FoglineError):  # ONNX Runtime refused this input
            exc = InvalidInputError(f"the model cannot run this input: {exc}")
        item.future.set_exception(exc)

    def _record(self, batch: list[_Item], rows: int, started: float, took: float) -> None:
        if self.metrics is None:
            return
        info = self.inner.info
        waits = [started - i.enqueued for i in batch]
        self.metrics.observe_execution(info.name, info.version, rows, took, waits)

    def _merge(self, batch: list[_Item]) -> dict[str, np.ndarray]:
        if len(batch) == 1:
            return batch[0].feeds
        width = max(i.length for i in batch)
        merged = {}
        for name in batch[0].feeds:
            parts = [i.feeds[name] for i in batch]
            if self.pads:
                parts = [np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts]
            merged[name] = np.concatenate(parts)
        return merged

    def _split(self, batch: list[_Item], results: list[Tensor]) -> list[list[Tensor]]:
        rows = sum(i.rows for i in batch)
        width = max(i.length for i in batch)
        for t in results:
            if t.data.ndim == 0 or t.data.shape[0] != rows:
                raise InvalidInputError(f"output {t.name!r} is not batched along its first axis")
        # Outputs with a dynamic second axis follow the sequence: cut back to each length.
        per_token = {s.name for s in self.inner.manifest.outputs if s.shape[1:2] == [-1]}
        parts: list[list[Tensor]] = []
        start = 0
        for item in batch:
            mine = []
            for t in results:
                data = t.data[start : start + item.rows]
                if self.pads and t.name in per_token and data.shape[1] == width != item.length:
                    data = data[:, : item.length]
                mine.append(Tensor(t.name, np.ascontiguousarray(data)))
            parts.append(mine)
            start += item.rows
        return parts

    def _golden_example(self) -> dict[str, np.ndarray] | None:
        """The package's golden inputs (a real row of the model's data), if it ships them."""
        inner = self.inner
        try:
            golden = inner.model_path.parent / inner.manifest.file("golden").name
            inputs, _ = load_golden(golden)
        except (FoglineError, OSError, KeyError, ValueError):
            return None
        if set(inputs) != {s.name for s in inner.manifest.inputs}:
            return None
        return inputs

    def _synthetic_example(self) -> dict[str, np.ndarray]:
        """One row of zeros (ones for a mask); dynamic inner dimensions of 128."""
        from common.inference import V2_TO_NUMPY

        feeds = {}
        for spec in self.inner.manifest.inputs:
            shape = [1] + [128 if d == -1 else d for d in spec.shape[1:]]
            fill = 1 if spec.name == MASK_INPUT else 0
            feeds[spec.name] = np.full(shape, fill, dtype=V2_TO_NUMPY[spec.datatype])
        return feeds


def with_batching(
    runtime: OnnxRuntime, settings: BatchSettings | None, metrics: ServingMetrics
) -> OnnxRuntime | BatchingRuntime:
    """``runtime`` ready to serve: batched unless ``settings`` is None; ``load()`` the result
    (a batched one calibrates there). Settings' ``max_batch`` 0 takes the package's
    ``routing.max_local_batch`` (the most rows its edge runs at once), at most
    ``DEFAULT_MAX_BATCH``. Either way its executions are counted in ``metrics``."""
    if settings is None:
        runtime.metrics = metrics
        return runtime
    if settings.max_batch == 0:
        hint = runtime.manifest.routing.max_local_batch
        settings = replace(settings, max_batch=max(1, min(hint, DEFAULT_MAX_BATCH)))
    return BatchingRuntime(runtime, settings, metrics=metrics)


__all__ = ["INLINE_BELOW_US", "BatchingRuntime", "with_batching"]
