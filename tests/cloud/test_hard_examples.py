"""Hard examples through a real control plane: devices upload, operators download a data set."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import numpy as np
import pytest

from cloud.hard_examples import (
    HARD_EXAMPLES,
    MAX_UPLOAD_EXAMPLES,
    HardExampleStore,
    parse_upload,
)
from cloud.pipeline.model_data import load_model_data
from common.device_token import issue_token
from common.inference import InferRequest, InferResponse, Tensor
from common.manifest import TensorSpec
from common.signing import Signer
from edge.hard_examples import HardExampleStore as DeviceStore
from fogline.cli import main
from tests.conftest import free_port
from tests.edge.agent_harness import ControlPlane
from tests.model_fixtures import CLASSES, IN_FEATURES, make_package, toy_input


def _tensor(name: str, x: np.ndarray) -> dict:
    datatype = {"float32": "FP32", "int64": "INT64", "float64": "FP64"}[str(x.dtype)]
    return {"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.ravel().tolist()}


def _example(rows: int = 2, *, x: np.ndarray | None = None, probs: np.ndarray | None = None):
    x = toy_input(rows) if x is None else x
    if probs is None:
        probs = np.eye(CLASSES, dtype=np.float32)[np.arange(rows) % CLASSES]
    return {
        "request": {"inputs": [_tensor("input", x)]},
        "response": {"model_name": "toy", "outputs": [_tensor("probabilities", probs)]},
    }


async def _post(s, cp, body, token, model="toy", **kw):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with s.post(f"{cp.url}/api/hard-examples/{model}", json=body, headers=headers, **kw) as r:
        return r.status, await r.json()


async def test_devices_upload_and_operators_get_a_training_set(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp, aiohttp.ClientSession() as s:
        record = cp.publish_toy(tmp_path, "1")
        for device in ("dev-a", "dev-b"):
            status, doc = await _post(
                s, cp, {"examples": [_example(3), _example(1)]}, issue_token(cp.signer, device)
            )
            assert (status, doc) == (201, {"model": "toy", "rows": 4})
        async with s.get(f"{cp.url}/api/hard-examples", headers=cp.auth("viewer")) as r:
            assert (await r.json())["models"] == [
                {"model": "toy", "rows": 8, "uploads": 2, "devices": 2}
            ]
        async with s.get(f"{cp.url}/api/hard-examples/toy", headers=cp.auth("viewer")) as r:
            assert r.status == 200
            (tmp_path / "hard.npz").write_bytes(await r.read())
        data = load_model_data(tmp_path / "hard.npz", record.manifest.inputs)
        assert data.rows == 8 and data.inputs["input"].shape == (8, IN_FEATURES)
        # The cloud's answer became the label: argmax of the probabilities it sent.
        assert data.labels is not None and list(data.labels[:4]) == [0, 1, 2, 0]


def _bad_bodies() -> dict[str, tuple[dict | bytes, int]]:
    nan = toy_input(1).copy()
    nan[0, 0] = np.nan
    return {
        "not json": (b"{", 400),
        "no examples": ({"examples": []}, 400),
        "wrong input name": (
            {"examples": [{**_example(), "request": {"inputs": [_tensor("x", toy_input(2))]}}]},
            400,
        ),
        "wrong dtype": ({"examples": [_example(x=toy_input(2).astype(np.float64))]}, 400),
        "wrong width": ({"examples": [_example(x=np.zeros((2, 3), np.float32))]}, 400),
        "NaN input": ({"examples": [_example(1, x=nan)]}, 400),
        "no rows": ({"examples": [_example(0)]}, 400),  # was a 500: argmax of no rows
        "rows disagree": ({"examples": [_example(2, probs=np.eye(CLASSES, dtype="f4"))]}, 400),
        "too many": ({"examples": [_example(1)] * (MAX_UPLOAD_EXAMPLES + 1)}, 413),
        "2 MiB": ({"examples": [_example(1)], "pad": "x" * (2 << 20)}, 413),
    }


@pytest.mark.parametrize("case", sorted(_bad_bodies()))
async def test_bad_uploads_are_refused_and_store_nothing(mosquitto, tmp_path, case) -> None:
    body, want = _bad_bodies()[case]
    async with ControlPlane(tmp_path / "control", mosquitto) as cp, aiohttp.ClientSession() as s:
        cp.publish_toy(tmp_path, "1")
        token = issue_token(cp.signer, "dev-a")
        headers = {"Authorization": f"Bearer {token}"}
        kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with s.post(f"{cp.url}/api/hard-examples/toy", headers=headers, **kwargs) as r:
            assert r.status == want, (case, await r.text())
            assert "error" in await r.json()
        assert cp.app[HARD_EXAMPLES].summary() == []


async def test_only_a_device_of_this_plane_may_upload(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp, aiohttp.ClientSession() as s:
        cp.publish_toy(tmp_path, "1")
        body = {"examples": [_example()]}
        assert (await _post(s, cp, body, None))[0] == 401
        assert (await _post(s, cp, body, issue_token(Signer.generate(), "dev-a")))[0] == 401
        for role in ("viewer", "operator", "admin"):  # an operator cannot pose as a device
            assert (await _post(s, cp, body, cp.tokens[role]))[0] == 403
        device = issue_token(cp.signer, "dev-a")
        assert (await _post(s, cp, body, device, model="nope"))[0] == 404
        for hostile in ("..%2F..%2Fkeys", "%2E%2E", "a" * 80):
            assert (await _post(s, cp, body, device, model=hostile))[0] in (400, 404)
        assert cp.app[HARD_EXAMPLES].summary() == []
        assert not (tmp_path / "control" / "keys" / "hard-examples").exists()


async def test_the_store_keeps_the_newest_rows_within_its_bound(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp, aiohttp.ClientSession() as s:
        cp.publish_toy(tmp_path, "1")
        store = cp.app[HARD_EXAMPLES]
        store.max_rows = 10
        token = issue_token(cp.signer, "dev-a")
        for i in range(4):
            x = np.full((4, IN_FEATURES), float(i), np.float32)
            assert (await _post(s, cp, {"examples": [_example(4, x=x)]}, token))[0] == 201
        async with s.get(f"{cp.url}/api/hard-examples/toy", headers=cp.auth("viewer")) as r:
            with np.load(io.BytesIO(await r.read())) as npz:
                kept = npz["input"][:, 0]
        assert sorted(set(kept.tolist())) == [2.0, 3.0]  # the two newest uploads, 8 rows


async def test_one_device_flooding_the_store_pushes_out_only_its_own_examples(
    mosquitto, tmp_path
) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp, aiohttp.ClientSession() as s:
        cp.publish_toy(tmp_path, "1")
        store = cp.app[HARD_EXAMPLES]
        store.max_rows = 12
        honest = np.full((4, IN_FEATURES), 7.0, np.float32)
        body = {"examples": [_example(4, x=honest)]}
        assert (await _post(s, cp, body, issue_token(cp.signer, "honest")))[0] == 201
        flood = issue_token(cp.signer, "evil")
        for _ in range(6):
            assert (await _post(s, cp, {"examples": [_example(4)]}, flood))[0] == 201
        assert store.summary() == [{"model": "toy", "rows": 12, "uploads": 3, "devices": 2}]
        async with s.get(f"{cp.url}/api/hard-examples/toy", headers=cp.auth("viewer")) as r:
            with np.load(io.BytesIO(await r.read())) as npz:
                assert (npz["input"][:, 0] == 7.0).sum() == 4  # the honest device's rows


def test_concurrent_uploads_and_reads_never_fail(tmp_path) -> None:
    """The routes run the store in threads: a trim deleted files that a concurrent listing
    or download had just globbed (FileNotFoundError: a 500 for the reader)."""
    manifest = make_package(tmp_path / "pkg").manifest
    store = HardExampleStore(tmp_path / "store", registry=None, max_rows=4)  # type: ignore[arg-type]
    arrays = parse_upload(json.dumps({"examples": [_example(4)]}).encode(), manifest)[0]
    store.add("toy", "dev-a", arrays)

    def upload() -> None:
        store.add("toy", "dev-a", arrays)  # each one trims the one before

    def read() -> None:
        store.summary()
        store.dataset("toy", manifest)

    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(f) for _ in range(150) for f in (upload, read)]:
            future.result()  # raises what the thread raised


@pytest.mark.parametrize("task", ["classification", "image-classification"])
def test_a_classifiers_examples_are_labelled_with_the_clouds_argmax(tmp_path, task) -> None:
    """The digits pipeline packages with task "image-classification": its hard examples
    were kept as reference outputs, and training on them (fogline demo's turn) failed."""
    manifest = dataclasses.replace(make_package(tmp_path / "pkg").manifest, task=task)
    probs = np.eye(CLASSES, dtype=np.float32)[[3, 1, 2]]
    body = json.dumps({"examples": [_example(3, probs=probs)]}).encode()
    arrays, rows = parse_upload(body, manifest)
    assert rows == 3 and "reference" not in arrays
    assert arrays["labels"].tolist() == [3, 1, 2]


def test_uploads_that_do_not_stack_leave_the_data_set_readable(tmp_path) -> None:
    """A dynamic dimension (a text model's sequence length) differs between uploads:
    the download was a 500 (np.concatenate) for every reader; the odd ones are left out."""
    manifest = make_package(tmp_path / "pkg").manifest
    manifest = dataclasses.replace(manifest, inputs=[TensorSpec("input", "FP32", [-1, -1])])
    store = HardExampleStore(tmp_path / "store", registry=None)  # type: ignore[arg-type]
    for width in (IN_FEATURES, 3, IN_FEATURES):
        x = np.ones((2, width), np.float32)
        body = json.dumps({"examples": [_example(2, x=x)]}).encode()
        store.add("toy", "dev-a", parse_upload(body, manifest)[0])
    with np.load(io.BytesIO(store.dataset("toy", manifest))) as npz:
        assert npz["input"].shape == (4, IN_FEATURES) and len(npz["labels"]) == 4


def test_rows_of_a_dynamic_dimension_are_bounded_on_disk_too(tmp_path) -> None:
    """50k rows were the only bound: with a sequence axis one row can be megabytes."""
    manifest = make_package(tmp_path / "pkg").manifest
    manifest = dataclasses.replace(manifest, inputs=[TensorSpec("input", "FP32", [-1, -1])])
    store = HardExampleStore(tmp_path / "store", registry=None)  # type: ignore[arg-type]
    store.max_bytes = 200_000
    for _ in range(5):
        body = json.dumps({"examples": [_example(1, x=np.ones((1, 20_000), np.float32))]})
        store.add("toy", "dev-a", parse_upload(body.encode(), manifest)[0])
    on_disk = sum(f.stat().st_size for f in (tmp_path / "store" / "toy").glob("*.npz"))
    assert 0 < on_disk <= 200_000


def _train_steps(tmp_path, *extra: str) -> int:  # type: ignore[no-untyped-def]
    """``fogline model train`` for one epoch; the number of optimizer steps it took."""
    metrics = tmp_path / f"metrics-{len(extra)}.json"
    argv = ["model", "train", "--model", "digits-edge", "--epochs", "1"]
    argv += ["--out", str(tmp_path / "m.onnx"), "--metrics-out", str(metrics)]
    for source in extra:
        argv += ["--extra-data", source]
    assert main(argv) == 0
    return json.loads(metrics.read_text())["steps"]


async def test_training_takes_the_fleets_hard_examples(mosquitto, tmp_path, monkeypatch) -> None:
    """The toy model's input is 64 floats, like digits: the fleet's rows join its training."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp, aiohttp.ClientSession() as s:
        cp.publish_toy(tmp_path, "1")
        token = issue_token(cp.signer, "dev-a")
        examples = [_example(16, x=toy_input(16, seed=i)) for i in range(32)]  # 512 rows
        assert (await _post(s, cp, {"examples": examples}, token))[0] == 201
        monkeypatch.setenv("FOGLINE_CONTROL", cp.url)
        monkeypatch.setenv("FOGLINE_TOKEN", cp.tokens["viewer"])
        plain = await asyncio.to_thread(_train_steps, tmp_path)
        more = await asyncio.to_thread(_train_steps, tmp_path, "hard-examples:toy")
        assert more > plain  # 512 more rows, more steps in the same one epoch


@pytest.mark.parametrize(
    ("arrays", "says"),
    [
        ({"input": np.zeros((4, 3), np.float32), "labels": np.zeros(4, np.int64)}, "rows are [3]"),
        ({"input": np.zeros((4, 64), np.float32)}, "needs arrays"),
        ({"input": np.zeros((4, 64), np.float32), "labels": np.zeros(2, np.int64)}, "row counts"),
    ],
)
def test_bad_extra_data_is_one_error_line(tmp_path, capsys, arrays, says) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    argv = ["model", "train", "--model", "digits-edge", "--epochs", "1"]
    argv += ["--out", str(tmp_path / "m.onnx"), "--extra-data", str(bad)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and not (tmp_path / "m.onnx").exists()


def _escalation(rows: int, seed: int = 0) -> tuple[InferRequest, InferResponse]:
    probs = np.eye(CLASSES, dtype=np.float32)[np.arange(rows) % CLASSES]
    request = InferRequest("toy", [Tensor("input", toy_input(rows, seed=seed))])
    return request, InferResponse("toy", [Tensor("probabilities", probs)])


async def test_the_device_store_samples_keeps_and_uploads(mosquitto, tmp_path) -> None:
    """edge/hard_examples.py against a real control plane: what was kept arrives once."""
    store = DeviceStore(tmp_path / "hard.sqlite", sample_rate=1.0, max_rows=5)
    for seed in range(7):
        assert store.offer("1", *_escalation(2, seed), "uncertain")
    assert not store.offer("1", *_escalation(1), "heavy")  # a heavy batch teaches nothing
    nan = _escalation(1)
    nan[1].outputs[0].data[0, 0] = np.nan
    assert not store.offer("1", *nan, "uncertain")  # not JSON: not kept, no exception
    assert store.pending() == 5  # bounded: the oldest two went
    unreachable = f"http://127.0.0.1:{free_port()}"
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            await store.upload_once(s, unreachable, "x")
        assert store.pending() == 5  # kept for later
        async with ControlPlane(tmp_path / "control", mosquitto) as cp:
            cp.publish_toy(tmp_path, "1")
            forged = issue_token(Signer.generate(), "dev-a")
            assert await store.upload_once(s, cp.url, forged) == 0
            assert store.pending() == 5  # 401: a token problem, kept until it is fixed
            assert await store.upload_once(s, cp.url, issue_token(cp.signer, "dev-a")) == 5
            assert store.pending() == 0
            assert cp.app[HARD_EXAMPLES].summary()[0]["rows"] == 10
            store.offer("0", *_escalation(2), "uncertain")  # a version never published
            assert await store.upload_once(s, cp.url, issue_token(cp.signer, "dev-a")) == 0
            assert store.stats()["dropped"] == 1 and store.pending() == 0  # 404: dropped
    store.close()


def test_the_device_store_is_bounded_in_bytes(tmp_path) -> None:
    """2,000 rows of up to 256 KB each (a client picks the size) was the only bound."""
    store = DeviceStore(tmp_path / "hard.sqlite", sample_rate=1.0, max_bytes=200_000)
    for seed in range(20):
        assert store.offer("1", *_escalation(20, seed), "uncertain")  # ~25 KB each
    ((total, newest),) = store._run("SELECT SUM(LENGTH(body)), MAX(id) FROM examples")
    assert 0 < total <= 200_000 and newest == 20 and store.pending() < 20
    store.close()


async def test_a_batch_too_large_for_the_control_plane_is_split_not_dropped(
    mosquitto, tmp_path
) -> None:
    """64 examples of 40 rows are 2,560 rows (> 1,024 per upload) and ~3 MB (> 1 MiB):
    a 413 dropped every example in the batch; one large escalation (a client's request)
    took the honest ones with it."""
    store = DeviceStore(tmp_path / "hard.sqlite", sample_rate=1.0)
    for seed in range(30):
        assert store.offer("1", *_escalation(40, seed), "uncertain")
    async with ControlPlane(tmp_path / "control", mosquitto) as cp, aiohttp.ClientSession() as s:
        cp.publish_toy(tmp_path, "1")
        assert await store.upload_once(s, cp.url, issue_token(cp.signer, "dev-a")) == 30
        assert store.stats() == {"pending": 0, "uploaded": 30, "dropped": 0}
        assert cp.app[HARD_EXAMPLES].summary()[0]["rows"] == 1200
    store.close()
