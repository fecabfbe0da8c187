"""Dynamic batching on real ONNX Runtime sessions: merged, split back, isolated, padded."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from common.batch_calibration import ROUNDS, Calibration, calibrate, preferred_size
from common.batch_settings import DEADLINE_HEADER, DEADLINE_PARAM, BatchSettings
from common.batcher import WORKERS, BatchingRuntime
from common.dataplane import DataPlane
from common.errors import DeadlineExceededError, InvalidInputError
from common.inference import InferRequest, Tensor, bytes_array
from common.onnx_runtime import OnnxRuntime
from common.serving_metrics import parse
from common.text import TEXT_INPUT
from common.v2_server import build_v2_app
from tests.common.token_model import TokenModel, make_token_model, tokens
from tests.model_fixtures import Package, reference_output, toy_input, v2_infer_body
from tests.text_model import make_text_package, words


@pytest.fixture(scope="module")
def token_model(tmp_path_factory: pytest.TempPathFactory) -> TokenModel:
    return make_token_model(tmp_path_factory.mktemp("tokens"))


@pytest.fixture
async def batched_tokens(token_model: TokenModel) -> AsyncIterator[BatchingRuntime]:
    rt = BatchingRuntime(token_model.runtime(), BatchSettings(max_batch=16, calibrate=False))
    await rt.load()
    yield rt
    await rt.unload()


@pytest.fixture
async def alone(token_model: TokenModel) -> AsyncIterator[OnnxRuntime]:
    rt = token_model.runtime()
    await rt.load()
    yield rt
    await rt.unload()


def token_request(ids: np.ndarray, outputs: list[str] | None = None) -> InferRequest:
    mask = np.ones_like(ids)
    inputs = [Tensor("input_ids", ids), Tensor("attention_mask", mask)]
    return InferRequest("tokens", inputs, outputs=outputs)


async def test_concurrent_requests_run_as_one_batch_and_split_back(package: Package) -> None:
    dp = DataPlane("s", "0")
    inner = OnnxRuntime(package.model_path, package.manifest)
    rt = BatchingRuntime(inner, BatchSettings(max_batch=32), metrics=dp.metrics)
    await rt.load()
    try:
        assert rt.calibration is not None and 1 <= rt.preferred <= 32
        assert rt.info.parameters["fogline.batching.preferred_batch"] == rt.preferred
        xs = [toy_input(rows, seed=i) for i, rows in enumerate([1, 2, 3, 1, 4, 1, 2, 1])]
        requests = [InferRequest("toy", [Tensor("input", x)], id=str(i)) for i, x in enumerate(xs)]
        answers = await asyncio.gather(*(rt.infer(r) for r in requests))
        for i, (x, answer) in enumerate(zip(xs, answers, strict=True)):
            assert answer.id == str(i)
            got = answer.output("probabilities").data
            np.testing.assert_allclose(got, reference_output(package.model_path, x), rtol=1e-5)
        m = parse(dp.metrics.render().decode())
        toy = {"model": "toy", "version": "1"}
        assert m["nv_inference_count_total"] == [(toy, 15.0)]  # rows
        assert m["nv_inference_exec_count_total"] == [(toy, 1.0)]  # all in one run
        assert (toy, 8.0) in m["fogline_inference_queue_seconds_count"]
    finally:
        await rt.unload()


async def test_a_bad_row_never_fails_its_batch_mates(
    batched_tokens: BatchingRuntime, alone: OnnxRuntime
) -> None:
    good = [tokens(6, seed) for seed in range(5)]
    bad = good[2].copy()
    bad[0, 3] = 10_000  # past the vocabulary: ONNX Runtime's Gather refuses the whole run
    ids = [*good[:2], bad, *good[2:]]
    results = await asyncio.gather(
        *(batched_tokens.infer(token_request(x)) for x in ids), return_exceptions=True
    )
    assert isinstance(results[2], InvalidInputError)
    assert "cannot run this input" in str(results[2])
    for x, result in zip(ids[:2] + ids[3:], results[:2] + results[3:], strict=True):
        assert not isinstance(result, BaseException)
        want = (await alone.infer(token_request(x))).output("logits").data
        np.testing.assert_allclose(result.output("logits").data, want, rtol=1e-5, atol=1e-6)


async def test_a_malformed_request_is_refused_alone(batched_tokens: BatchingRuntime) -> None:
    wrong = InferRequest("tokens", [Tensor("input_ids", np.zeros((1, 4), np.float32))])
    results = await asyncio.gather(
        batched_tokens.infer(token_request(tokens(4, 1))),
        batched_tokens.infer(wrong),
        batched_tokens.infer(token_request(tokens(4, 2))),
        return_exceptions=True,
    )
    assert isinstance(results[1], InvalidInputError)
    assert not isinstance(results[0], BaseException)
    assert not isinstance(results[2], BaseException)


async def test_sequences_of_different_lengths_are_padded_and_masked(
    token_model: TokenModel, alone: OnnxRuntime
) -> None:
    dp = DataPlane("s", "0")
    rt = BatchingRuntime(
        token_model.runtime(), BatchSettings(max_batch=16, calibrate=False), metrics=dp.metrics
    )
    await rt.load()
    try:
        assert rt.pads
        # 8 tokens at most: the padded width equals the pooled output's width (8), which
        # must not be cut as if it were a sequence.
        ids = [tokens(length, seed) for seed, length in enumerate([3, 8, 5, 1, 7])]
        answers = await asyncio.gather(*(rt.infer(token_request(x)) for x in ids))
        for x, answer in zip(ids, answers, strict=True):
            want = (await alone.infer(token_request(x))).output("pooled").data
            np.testing.assert_allclose(answer.output("pooled").data, want, rtol=1e-5, atol=1e-6)
        m = parse(dp.metrics.render().decode())
        assert m["nv_inference_exec_count_total"][0][1] == 1.0  # one padded run for all five
    finally:
        await rt.unload()


async def test_requests_for_other_outputs_are_grouped_apart(
    token_model: TokenModel,
) -> None:
    dp = DataPlane("s", "0")
    rt = BatchingRuntime(
        token_model.runtime(), BatchSettings(max_batch=16, calibrate=False), metrics=dp.metrics
    )
    await rt.load()
    try:
        answers = await asyncio.gather(
            rt.infer(token_request(tokens(4, 1))),
            rt.infer(token_request(tokens(4, 2), outputs=["logits"])),
            rt.infer(token_request(tokens(4, 3))),
        )
        assert [len(a.outputs) for a in answers] == [2, 1, 2]
        m = parse(dp.metrics.render().decode())
        assert m["nv_inference_exec_count_total"][0][1] == 2.0  # two groups, two runs
    finally:
        await rt.unload()


def test_preferred_size_is_where_throughput_stops_rising() -> None:
    seconds = {1: 1.0, 2: 1.1, 4: 1.3, 8: 2.5, 16: 5.2}  # rows/s: 1, 1.8, 3.1, 3.2, 3.08
    assert preferred_size(seconds) == 4
    assert Calibration(4, seconds).as_dict()["preferred_batch"] == 4


class CountingRuntime(OnnxRuntime):
    """A real runtime that records the batch size of each run."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.sizes: list[int] = []

    def infer_sync(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> list[Tensor]:
        self.sizes.append(next(iter(feeds.values())).shape[0])
        return super().infer_sync(feeds, outputs)


async def test_calibration_times_the_sizes_in_interleaved_passes(package: Package) -> None:
    """A busy phase of the host then weighs on every size, not on the one it fell on."""
    rt = CountingRuntime(package.model_path, package.manifest)
    await rt.load()
    try:
        cal = await asyncio.to_thread(calibrate, rt, {"input": toy_input(1)}, 8, 0.3)
    finally:
        await rt.unload()
    assert set(cal.seconds) <= {1, 2, 4, 8} and 1 in cal.seconds
    # Each pass visits the sizes in order: a size's runs come in ROUNDS separate blocks.
    blocks = [s for i, s in enumerate(rt.sizes) if i == 0 or rt.sizes[i - 1] != s]
    for size in cal.seconds:
        assert blocks.count(size) == ROUNDS
    assert blocks[: len(cal.seconds)] == sorted(cal.seconds)  # the first pass, small to large


@pytest.mark.parametrize(
    "kw",
    [{"max_batch": -1}, {"max_batch": 10**6}, {"max_delay_us": -1.0}, {"max_delay_us": math.inf},
     {"max_delay_us": math.nan}],
)  # fmt: skip
def test_batch_settings_are_checked(kw: dict) -> None:
    with pytest.raises(InvalidInputError):
        BatchSettings(**kw)


# --- deadlines over HTTP ------------------------------------------------------------


@pytest.fixture
async def deadline_client(package: Package) -> AsyncIterator[TestClient]:
    dp = DataPlane("s", "0")
    rt = BatchingRuntime(
        OnnxRuntime(package.model_path, package.manifest), BatchSettings(), metrics=dp.metrics
    )
    await rt.load()  # calibrated: the batcher knows what a run costs
    dp.register(rt)
    c = TestClient(TestServer(build_v2_app(dp), host="127.0.0.1"))
    await c.start_server()
    yield c
    await c.close()
    await rt.unload()


INFER = "/v2/models/toy/infer"


@pytest.mark.parametrize(
    "value", ["NaN", "nan", "-5", "0", "inf", "1e309", "99999999999", "soon", "", "1" * 40]
)
async def test_bad_deadline_header_is_400(deadline_client: TestClient, value: str) -> None:
    resp = await deadline_client.post(
        INFER, json=v2_infer_body(1), headers={DEADLINE_HEADER: value}
    )
    assert resp.status == 400
    assert DEADLINE_PARAM in (await resp.json())["error"]


@pytest.mark.parametrize("value", [-1, 0, 1e12, "soon", True, [5], {"ms": 5}, None])
async def test_bad_deadline_parameter_is_400(deadline_client: TestClient, value: object) -> None:
    body = v2_infer_body(1, **{DEADLINE_PARAM: value})
    resp = await deadline_client.post(INFER, json=body)
    if value is None:  # absent: no deadline
        assert resp.status == 200
    else:
        assert resp.status == 400


async def test_a_deadline_that_cannot_be_met_is_503_not_a_late_answer(
    deadline_client: TestClient,
) -> None:
    # One microsecond: shorter than any run the calibration measured.
    late = await deadline_client.post(
        INFER, json=v2_infer_body(1), headers={DEADLINE_HEADER: "0.001"}
    )
    assert late.status == 503 and late.headers["Retry-After"] == "1"
    assert "deadline" in (await late.json())["error"]
    ok = await deadline_client.post(INFER, json=v2_infer_body(1, **{DEADLINE_PARAM: 10_000}))
    assert ok.status == 200
    m = parse(await (await deadline_client.get("/metrics")).text())
    toy = {"model": "toy", "version": "1"}
    assert m["nv_inference_request_failure_total"] == [({**toy, "reason": "deadline"}, 1.0)]
    assert m["nv_inference_request_success_total"] == [(toy, 1.0)]


class HeldRuntime(OnnxRuntime):
    """A real runtime whose runs wait until the test releases them."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.started = threading.Semaphore(0)
        self.release = threading.Event()

    def infer_sync(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> list[Tensor]:
        self.started.release()
        self.release.wait(30)
        return super().infer_sync(feeds, outputs)


async def test_a_request_whose_deadline_passes_in_the_queue_is_refused(
    package: Package,
) -> None:
    held = HeldRuntime(package.model_path, package.manifest)
    rt = BatchingRuntime(held, BatchSettings(max_batch=4, calibrate=False))
    await rt.load()
    try:
        # One held run per worker: the model is busy, the next request must queue.
        groups: list[list[str] | None] = [None, ["probabilities"]]  # apart: a run each
        assert len(groups) == WORKERS
        firsts = [
            asyncio.create_task(
                rt.infer(InferRequest("toy", [Tensor("input", toy_input(1))], outputs=outputs))
            )
            for outputs in groups
        ]
        for _ in range(WORKERS):
            assert await asyncio.to_thread(held.started.acquire, True, 30)
        request = InferRequest(
            "toy", [Tensor("input", toy_input(1))], parameters={DEADLINE_PARAM: 20}
        )
        waiting = asyncio.create_task(rt.infer(request))
        await asyncio.sleep(0.1)  # its 20 ms pass while it waits in the queue
        held.release.set()
        for first in firsts:
            assert len((await first).outputs) == 1
        with pytest.raises(DeadlineExceededError):
            await waiting
    finally:
        held.release.set()
        await rt.unload()


async def test_texts_of_different_lengths_are_tokenized_padded_and_batched(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    package = make_text_package(tmp_path_factory.mktemp("text") / "pkg", variant="cloud")
    dp = DataPlane("s", "0")
    batched = BatchingRuntime(
        OnnxRuntime(package.model_path, package.manifest),
        BatchSettings(max_batch=8, calibrate=False),
        metrics=dp.metrics,
    )
    alone = OnnxRuntime(package.model_path, package.manifest)
    await batched.load()
    await alone.load()
    try:
        assert batched.pads
        texts = [words(n) for n in (3, 40, 1, 17)]

        def request(text: str) -> InferRequest:
            return InferRequest("text", [Tensor(TEXT_INPUT, bytes_array([text], 1, "text"))])

        answers = await asyncio.gather(*(batched.infer(request(t)) for t in texts))
        for text, answer in zip(texts, answers, strict=True):
            want = (await alone.infer(request(text))).output("embedding").data
            got = answer.output("embedding").data
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        m = parse(dp.metrics.render().decode())
        assert m["nv_inference_exec_count_total"][0][1] == 1.0  # four texts, one run
    finally:
        await batched.unload()
        await alone.unload()


class SlowHeldRuntime(HeldRuntime):
    """Held, and never fast enough to be run inline on the event loop."""

    def infer_sync(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> list[Tensor]:
        time.sleep(0.002)
        return super().infer_sync(feeds, outputs)


async def test_a_worker_whose_batch_mates_were_taken_keeps_serving(package: Package) -> None:
    """Both workers wait for batch-mates of one request; the one that loses it must go on
    waiting, not die (a dead worker made the next request restart both, cancelling the
    run in flight: its requests got 503)."""
    held = SlowHeldRuntime(package.model_path, package.manifest)
    rt = BatchingRuntime(held, BatchSettings(max_batch=32, max_delay_us=50_000, calibrate=False))
    await rt.load()
    try:
        held.release.set()
        await rt.infer(InferRequest("toy", [Tensor("input", toy_input(2))]))  # batches now wait
        assert await asyncio.to_thread(held.started.acquire, True, 30)
        held.release.clear()
        first = asyncio.create_task(rt.infer(InferRequest("toy", [Tensor("input", toy_input(1))])))
        assert await asyncio.to_thread(held.started.acquire, True, 30)  # one worker runs it
        await asyncio.sleep(0.2)  # the other's wait for batch-mates ends: nothing is left
        second = asyncio.create_task(rt.infer(InferRequest("toy", [Tensor("input", toy_input(1))])))
        await asyncio.sleep(0.2)
        held.release.set()
        for task in (first, second):
            assert (await task).output("probabilities").data.shape[0] == 1
    finally:
        held.release.set()
        await rt.unload()
