"""Text in through V2: the BYTES codec, the tokenizer limits, and every way to misuse them.

A real ONNX model packaged with MiniLM's real ``tokenizer.json`` (tests/text_model.py),
served by the real V2 app on loopback.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from tokenizers import Tokenizer

from common.errors import InvalidInputError
from common.inference import InferRequest, Tensor, request_from_rest, request_to_rest
from common.onnx_runtime import OnnxRuntime
from common.text import MAX_TEXT_BYTES, SequenceTooLongError, TextEncoder
from common.v2_binary import BINARY_HEADER, decode_infer_request, encode_infer_request
from common.v2_server import DataPlane, build_v2_app
from tests.model_fixtures import Package
from tests.text_model import make_text_package, words


@pytest.fixture(scope="module")
def text_pkg(tmp_path_factory: pytest.TempPathFactory) -> Package:
    return make_text_package(tmp_path_factory.mktemp("text") / "pkg", variant="cloud")


@pytest.fixture
async def client(text_pkg: Package) -> AsyncIterator[TestClient]:
    runtime = OnnxRuntime(text_pkg.model_path, text_pkg.manifest)
    await runtime.load()
    dataplane = DataPlane("test", "0")
    dataplane.register(runtime)
    c = TestClient(TestServer(build_v2_app(dataplane), host="127.0.0.1"))
    await c.start_server()
    yield c
    await c.close()
    await runtime.unload()


def text_body(*texts: str, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}
        ],
        **extra,
    }


def ids_body(ids: np.ndarray, mask: np.ndarray, dtype: str = "INT64") -> dict[str, Any]:
    def t(name: str, a: np.ndarray) -> dict[str, Any]:
        return {"name": name, "datatype": dtype, "shape": list(a.shape), "data": a.ravel().tolist()}

    return {"inputs": [t("input_ids", ids), t("attention_mask", mask)]}


def reference_tokens(pkg: Package, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids straight from the ``tokenizers`` library, padded by hand."""
    tok = Tokenizer.from_file(str(pkg.directory / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    encs = [tok.encode(t).ids for t in texts]
    longest = max(map(len, encs))
    ids = np.zeros((len(texts), longest), np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encs):
        ids[i, : len(e)], mask[i, : len(e)] = e, 1
    return ids, mask


async def infer(client: TestClient, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/v2/models/text/infer", json=body)
    return resp.status, await resp.json()


async def test_text_gives_the_embedding_of_its_tokens(client: TestClient, text_pkg: Package):
    texts = ["Hello world!", "A longer sentence, with punctuation; and naïve Unicode.", "東京"]
    status, by_text = await infer(client, text_body(*texts))
    assert status == 200, by_text
    ids, mask = reference_tokens(text_pkg, texts)
    status, by_ids = await infer(client, ids_body(ids, mask))
    assert status == 200, by_ids
    a = np.asarray(by_text["outputs"][0]["data"]).reshape(3, -1)
    b = np.asarray(by_ids["outputs"][0]["data"]).reshape(3, -1)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # Padding to the batch's longest text changes nothing: each alone gives the same row.
    status, alone = await infer(client, text_body(texts[1]))
    np.testing.assert_allclose(np.asarray(alone["outputs"][0]["data"]), a[1], atol=1e-5)


async def test_metadata_says_the_model_takes_text(client: TestClient):
    meta = await (await client.get("/v2/models/text")).json()
    assert meta["parameters"]["fogline.text_input"] == "text"
    assert meta["parameters"]["fogline.max_sequence_length"] == 512


async def test_text_at_the_limit_is_served_one_over_is_refused(client: TestClient):
    status, _ = await infer(client, text_body(words(510)))  # 512 with [CLS] and [SEP]
    assert status == 200
    status, doc = await infer(client, text_body("short", words(511)))
    assert status == 400
    assert "text[1] is 513 tokens, 1 over this model's limit of 512" in doc["error"]


def binary_text_request(elements: list[bytes], shape: list[int] | None = None) -> tuple[bytes, int]:
    blob = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": shape or [len(elements)],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    return head + blob, len(head)


async def post_binary(client: TestClient, body: bytes, header: int) -> tuple[int, dict[str, Any]]:
    resp = await client.post(
        "/v2/models/text/infer", data=body, headers={BINARY_HEADER: str(header)}
    )
    return resp.status, await resp.json()


async def test_binary_bytes_tensor_is_served(client: TestClient):
    status, doc = await post_binary(client, *binary_text_request([b"hello", "ça va".encode()]))
    assert status == 200, doc
    assert doc["outputs"][0]["shape"] == [2, 8]


ATTACKS: dict[str, tuple[Any, int, str]] = {
    "empty string": (text_body("fine", ""), 400, "text[1] is empty"),
    "blank string": (text_body("   "), 400, "text[0] is empty"),
    "lone surrogate": (text_body("ok", "\ud800"), 400, "text[1] is not valid UTF-8"),
    "10 MB string": (text_body("a " * (5 << 20)), 413, f"at most {MAX_TEXT_BYTES} per text"),
    "text and ids": (
        {
            "inputs": [
                *text_body("hi")["inputs"],
                *ids_body(np.array([[101, 102]]), np.ones((1, 2), np.int64))["inputs"],
            ]
        },
        400,
        "not both",
    ),
    "text as FP32": (
        {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
        400,
        "must be BYTES",
    ),
    "text as numbers": (
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [1]}]},
        400,
        "not a string",
    ),
    "text matrix": (
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}]},
        400,
        "list of texts [rows]",
    ),
    "no texts": (
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]},
        400,
        "non-empty",
    ),
    "ids as FP32": (
        ids_body(np.array([[101, 102]]), np.ones((1, 2)), dtype="FP32"),
        400,
        "must be INT64",
    ),
    "ids outside the vocabulary": (
        ids_body(np.array([[101, 99999]]), np.ones((1, 2), np.int64)),
        400,
        "token ids in [0, 30522)",
    ),
    "negative ids": (
        ids_body(np.array([[101, -1]]), np.ones((1, 2), np.int64)),
        400,
        "token ids",
    ),
    "ids and mask of different lengths": (
        {
            "inputs": [
                ids_body(np.array([[101, 102, 103]]), np.ones((1, 3), np.int64))["inputs"][0],
                ids_body(np.array([[101, 102]]), np.ones((1, 2), np.int64))["inputs"][1],
            ]
        },
        400,
        "share one shape",
    ),
    "ids longer than the model": (
        ids_body(np.full((1, 513), 7592), np.ones((1, 513), np.int64)),
        400,
        "513 tokens per row, 1 over",
    ),
}


@pytest.mark.parametrize("body,status,message", ATTACKS.values(), ids=ATTACKS.keys())
async def test_text_attacks_get_a_clear_error(client, body, status, message):
    got, doc = await infer(client, body)
    assert got == status, doc
    assert message in doc["error"]


async def test_binary_attacks_get_a_clear_error(client: TestClient):
    status, doc = await post_binary(client, *binary_text_request([b"ok", b"\xff\xfe\xfd"]))
    assert (status, "text[1] is not valid UTF-8" in doc["error"]) == (400, True)
    body, header = binary_text_request([b"hello"])
    status, doc = await post_binary(client, body[:-2], header)  # element cut short
    assert status == 400 and "bad binary_data_size" in doc["error"]
    body, header = binary_text_request([b"hello"])
    broken = body[:header] + struct.pack("<I", 1000) + body[header + 4 :]
    status, doc = await post_binary(client, broken, header)
    assert status == 400 and "overruns its data" in doc["error"]
    status, doc = await post_binary(client, *binary_text_request([b"a", b"b"], shape=[3]))
    assert status == 400 and "its shape needs 3" in doc["error"]
    # The server still serves afterwards: nothing was lost.
    status, _ = await post_binary(client, *binary_text_request([b"still fine"]))
    assert status == 200


def test_bytes_tensors_round_trip_through_json_and_binary():
    data = np.empty(3, dtype=object)
    data[:] = [b"plain", "émoji 😀".encode(), b""]
    req = InferRequest("m", [Tensor("text", data)], parameters={"fogline.route": "auto"})
    doc = request_to_rest(req)
    assert doc["inputs"][0]["datatype"] == "BYTES"
    assert doc["inputs"][0]["data"] == ["plain", "émoji 😀", ""]
    back = request_from_rest(json.dumps(doc), "m")
    assert list(back.inputs[0].data) == list(data)
    body, header = encode_infer_request(req)
    decoded, _ = decode_infer_request(body, header, "m", None)
    assert list(decoded.inputs[0].data) == list(data)
    assert decoded.inputs[0].datatype == "BYTES"


def test_bytes_that_are_not_utf8_cannot_travel_as_json():
    data = np.empty(1, dtype=object)
    data[0] = b"\xff"
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        request_to_rest(InferRequest("m", [Tensor("text", data)]))


def test_encoder_refuses_a_limit_below_two(text_pkg: Package):
    with pytest.raises(InvalidInputError):
        TextEncoder(text_pkg.directory / "tokenizer.json", 1)


def test_encoder_counts_special_tokens(text_pkg: Package):
    encoder = TextEncoder(text_pkg.directory / "tokenizer.json", 4)
    data = np.empty(1, dtype=object)
    data[0] = words(2).encode()
    assert encoder.encode(data)["input_ids"].shape == (1, 4)
    data[0] = words(3).encode()
    with pytest.raises(SequenceTooLongError) as err:
        encoder.encode(data)
    assert (err.value.tokens, err.value.limit) == (5, 4)


def test_a_broken_tokenizer_is_one_clear_error(tmp_path: Path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(InvalidInputError, match="cannot load tokenizer"):
        TextEncoder(bad, 128)
