"""Round-trip properties of the V2 codec (JSON and the binary tensor extension)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.errors import InvalidInputError
from common.inference import (
    V2_TO_NUMPY,
    InferRequest,
    InferResponse,
    Tensor,
    request_from_rest,
    request_to_rest,
    response_from_rest,
    response_to_rest,
)
from common.v2_binary import BinaryOutputs, decode_infer_request, encode_infer_response

names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
untimed = settings(deadline=None)  # properties, not timings: CI machines are slow and shared
parameters = st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=3)


@st.composite
def tensors(draw: st.DrawFn, finite: bool = False) -> Tensor:
    """Random tensors; ``finite`` for JSON, which has no NaN or infinity (binary has)."""
    dtype = V2_TO_NUMPY[draw(st.sampled_from(sorted(V2_TO_NUMPY)))]
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    elements = None
    if finite and dtype.kind == "f":
        elements = st.floats(width=8 * dtype.itemsize, allow_nan=False, allow_infinity=False)
    data = draw(hnp.arrays(dtype, shape, elements=elements))
    return Tensor(draw(names), data, draw(parameters))


requests = st.builds(
    InferRequest,
    model=names,
    inputs=st.lists(tensors(), min_size=1, max_size=3),
    id=st.none() | names,
    version=st.none() | names,
    parameters=parameters,
    outputs=st.none() | st.lists(names, max_size=3),
)
json_requests = st.builds(
    InferRequest,
    model=names,
    inputs=st.lists(tensors(finite=True), min_size=1, max_size=3),
    id=st.none() | names,
    version=st.none() | names,
    parameters=parameters,
    outputs=st.none() | st.lists(names, max_size=3),
)
responses = st.builds(
    InferResponse,
    model=names,
    outputs=st.lists(tensors(finite=True), max_size=3),
    id=st.none() | names,
    version=st.none() | names,
    parameters=parameters,
)


def assert_tensors_equal(got: list[Tensor], want: list[Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g.name, g.datatype, g.shape, g.parameters) == (
            w.name,
            w.datatype,
            w.shape,
            w.parameters,
        )
        assert np.array_equal(g.data, w.data, equal_nan=w.data.dtype.kind == "f")


@untimed
@given(json_requests)
def test_request_round_trip(req: InferRequest) -> None:
    wire = json.dumps(request_to_rest(req)).encode()
    back = request_from_rest(wire, req.model, req.version)
    assert (back.model, back.version, back.id) == (req.model, req.version, req.id)
    assert (back.parameters, back.outputs) == (req.parameters, req.outputs)
    assert_tensors_equal(back.inputs, req.inputs)


@untimed
@given(responses)
def test_response_round_trip(resp: InferResponse) -> None:
    back = response_from_rest(json.dumps(response_to_rest(resp)))
    assert (back.model, back.version, back.id, back.parameters) == (
        resp.model,
        resp.version,
        resp.id,
        resp.parameters,
    )
    assert_tensors_equal(back.outputs, resp.outputs)


@untimed
@given(requests)
def test_binary_request_round_trip(req: InferRequest) -> None:
    """Every input sent as binary data after a JSON header, as tritonclient does."""
    doc = request_to_rest(req)
    blobs = []
    for entry, t in zip(doc["inputs"], req.inputs, strict=True):
        blob = t.data.astype(t.data.dtype.newbyteorder("<")).tobytes()
        del entry["data"]
        entry["parameters"] = {**t.parameters, "binary_data_size": len(blob)}
        blobs.append(blob)
    header = json.dumps(doc).encode()
    back, _ = decode_infer_request(header + b"".join(blobs), len(header), req.model, req.version)
    assert_tensors_equal(back.inputs, req.inputs)


@untimed
@given(responses, st.booleans(), st.data())
def test_binary_response_round_trip(
    resp: InferResponse, default: bool, data: st.DataObject
) -> None:
    per_output = data.draw(
        st.dictionaries(st.sampled_from([t.name for t in resp.outputs] or ["x"]), st.booleans())
    )
    binary = BinaryOutputs(default, per_output)
    body, n = encode_infer_response(resp, binary)
    back = response_from_rest(body) if n is None else response_from_rest(_inline_binary(body, n))
    assert_tensors_equal(back.outputs, resp.outputs)


def _inline_binary(body: bytes, n: int) -> dict[str, Any]:
    """What a client does with a binary response: read each output's bytes back in."""
    doc = json.loads(body[:n])
    offset = n
    for out in doc["outputs"]:
        params = out.get("parameters", {})
        size = params.pop("binary_data_size", None)
        if size is not None:
            dtype = V2_TO_NUMPY[out["datatype"]].newbyteorder("<")
            out["data"] = np.frombuffer(body[offset : offset + size], dtype).tolist()
            offset += size
        if not params:
            out.pop("parameters", None)
    assert offset == len(body)
    return doc


@settings(max_examples=300, deadline=None)
@given(
    json_values
    | st.dictionaries(st.sampled_from(["inputs", "outputs", "id", "parameters"]), json_values)
)
def test_arbitrary_json_is_parsed_or_invalid(doc: Any) -> None:
    with contextlib.suppress(InvalidInputError):
        request_from_rest(json.dumps(doc), "m")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_body_is_parsed_or_invalid(data: st.DataObject) -> None:
    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}
    key = data.draw(st.sampled_from([*tensor, "extra"]))
    tensor[key] = data.draw(json_values | st.lists(st.integers(-(2**80), 2**80), max_size=3))
    for parse in (lambda b: request_from_rest(b, "m"), response_from_rest):
        body = {"inputs": [tensor], "model_name": "m", "outputs": [tensor]}
        with contextlib.suppress(InvalidInputError):
            parse(json.dumps(body))


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["inputs", "outputs", "parameters"]), json_values),
    st.binary(max_size=16),
)
def test_arbitrary_binary_request_is_parsed_or_invalid(doc: Any, blob: bytes) -> None:
    header = json.dumps(doc).encode()
    with contextlib.suppress(InvalidInputError):
        decode_infer_request(header + blob, len(header), "m", None)
    with contextlib.suppress(InvalidInputError):
        decode_infer_request(header, None, "m", None)


def test_binary_output_wish_is_not_passed_on() -> None:
    """binary_data_output is about this hop: the runtime (and the cloud) never see it."""
    body = json.dumps({**_one(), "parameters": {"binary_data_output": True, "keep": 1}})
    request, binary = decode_infer_request(body.encode(), None, "m", None)
    assert request.parameters == {"keep": 1} and binary.wants("anything")


@untimed
@given(st.binary(max_size=64))
def test_arbitrary_bytes_are_parsed_or_invalid(body: bytes) -> None:
    with contextlib.suppress(InvalidInputError):
        request_from_rest(body, "m")


def _one(**kw: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2], **kw}]}


MALFORMED = {
    "not json": b"{nope",
    "not utf-8": b"\xff\xfe{",
    "array body": b"[]",
    "inputs missing": b'{"id": "1"}',
    "inputs empty": b'{"inputs": []}',
    "tensor not object": b'{"inputs": [3]}',
    "no name": json.dumps({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}),
    "empty name": json.dumps(_one(name="")),
    "bad datatype": json.dumps(_one(datatype="FLOAT")),
    "datatype list": json.dumps(_one(datatype=["FP32"])),
    "BYTES numbers": json.dumps(_one(datatype="BYTES", data=[1, 2])),
    "BYTES too few": json.dumps(_one(datatype="BYTES", shape=[3], data=["a", "b"])),
    "BYTES too many": json.dumps(_one(datatype="BYTES", data=["a", "b", "c"])),
    "BYTES null": json.dumps(_one(datatype="BYTES", data=["a", None])),
    "BYTES not list": json.dumps(_one(datatype="BYTES", shape=[1], data="a")),
    "negative dim": json.dumps(_one(shape=[-2])),
    "bool dim": json.dumps(_one(shape=[True, True])),
    "shape not list": json.dumps(_one(shape=2)),
    "too few elements": json.dumps(_one(shape=[3])),
    "huge shape": json.dumps(_one(shape=[2**62, 2**62], data=[])),
    "zero and huge dims": json.dumps(_one(shape=[0, 2**70], data=[])),
    "null data": json.dumps(_one(data=None)),
    "scalar data": json.dumps(_one(shape=[], data=1.5)),
    "ragged data": json.dumps(_one(data=[[1], [2, 3]])),
    "overflow": json.dumps(_one(datatype="UINT8", data=[1, 300])),
    "FP32 overflow": json.dumps(_one(data=[1.0, 1e300])),
    "negative unsigned": json.dumps(_one(datatype="UINT32", data=[1, -1])),
    "text data": json.dumps(_one(data=["a", "b"])),
    "params not object": json.dumps({**_one(), "parameters": [1]}),
    "tensor params not object": json.dumps(_one(parameters="p")),
    "outputs not list": json.dumps({**_one(), "outputs": {"name": "y"}}),
    "output without name": json.dumps({**_one(), "outputs": [{"id": "y"}]}),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_raises_invalid_input(body: bytes | str) -> None:
    with pytest.raises(InvalidInputError):
        request_from_rest(body, "m")


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b'{"outputs": []}',
        b'{"model_name": 1, "outputs": []}',
        b'{"model_name": "m", "outputs": {}}',
        b'{"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]}',
    ],
)
def test_malformed_response_raises_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInputError):
        response_from_rest(body)


def test_nested_data_is_accepted() -> None:
    """V2 allows row-major nested lists as well as flat ones."""
    req = request_from_rest(_one(shape=[2, 1], data=[[1], [2]]), "m")
    assert req.inputs[0].data.tolist() == [[1.0], [2.0]]
