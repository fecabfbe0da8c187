"""Tensor data read straight into numpy means the same as ``json.loads`` would, or a 4xx."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.errors import InvalidInputError, PayloadTooLargeError
from common.inference import V2_TO_NUMPY, request_from_rest
from common.tensor_json import JsonLimits, NumericText, dumps_v2, parse_infer_json

NUMERIC = sorted(k for k, v in V2_TO_NUMPY.items() if v.kind in "iuf")
CUT = JsonLimits(min_cut_bytes=64)  # the numpy road from 64 bytes of text (as large bodies take)


def body(datatype: str, shape: list[int], data_text: str) -> bytes:
    head = json.dumps({"name": "x", "datatype": datatype, "shape": shape})
    return f'{{"inputs": [{head[:-1]}, "data": {data_text}}}]}}'.encode()


@st.composite
def formatted_arrays(draw: st.DrawFn) -> tuple[str, np.ndarray, str]:
    """A random finite tensor, written as JSON nested or flat, compact or spaced."""
    datatype = draw(st.sampled_from(NUMERIC))
    dtype = V2_TO_NUMPY[datatype]
    elements = None
    if dtype.kind == "f":
        elements = st.floats(width=8 * dtype.itemsize, allow_nan=False, allow_infinity=False)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12))
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    nested = draw(st.booleans())
    data = array.tolist() if nested else array.reshape(-1).tolist()
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n\t", " : ")]))
    return datatype, array, json.dumps(data, separators=sep)


@settings(max_examples=300, deadline=None)
@given(formatted_arrays())
def test_numpy_path_reads_what_json_loads_reads(case: tuple[str, np.ndarray, str]) -> None:
    datatype, array, text = case
    raw = body(datatype, list(array.shape), text)
    fast = request_from_rest(raw, "m", None, CUT).inputs[0].data
    default = request_from_rest(raw, "m").inputs[0].data  # small ones: json.loads
    slow = request_from_rest(json.loads(raw), "m").inputs[0].data  # plain Python objects
    assert fast.dtype == default.dtype == slow.dtype == array.dtype
    np.testing.assert_array_equal(fast, array)
    np.testing.assert_array_equal(default, array)
    np.testing.assert_array_equal(slow, array)


def long(values: str, n: int = 40) -> str:
    return ", ".join([values] * n)


MALFORMED_DATA = {
    "missing comma between arrays": "[[" + long("1") + "][" + long("2") + "]]",
    "number then array": "[" + long("1") + " [2]]",
    "empty element": "[" + long("1") + ",, 2]",
    "trailing comma": "[" + long("1") + ",]",
    "space-separated numbers": "[" + long("1") + " 2]",
    "unbalanced": "[[" + long("1") + "]",
    "overflow to infinity": "[" + long("1") + ", 1e999]",
    "hex": "[" + long("1") + ", 0x10]",
    "NaN": "[" + long("1") + ", NaN]",
}


@pytest.mark.parametrize("limits", [CUT, JsonLimits()], ids=["numpy", "json.loads"])
@pytest.mark.parametrize("text", MALFORMED_DATA.values(), ids=MALFORMED_DATA.keys())
def test_malformed_long_data_is_invalid(text: str, limits: JsonLimits) -> None:
    with pytest.raises(InvalidInputError):
        request_from_rest(body("FP32", [41], text), "m", None, limits)


def test_only_arrays_past_the_threshold_are_cut() -> None:
    """Small arrays go to json.loads (cheaper per request), large ones to numpy."""
    small = "[" + long("1.5", 100) + "]"
    large = "[" + long("1.5", 2000) + "]"
    assert len(small) < JsonLimits().min_cut_bytes <= len(large)
    data = parse_infer_json(body("FP32", [100], small), JsonLimits())["inputs"][0]["data"]
    assert data == [1.5] * 100
    data = parse_infer_json(body("FP32", [2000], large), JsonLimits())["inputs"][0]["data"]
    assert isinstance(data, NumericText) and data.count == 2000


@pytest.mark.parametrize("limits", [CUT, JsonLimits()], ids=["numpy", "json.loads"])
def test_integers_out_of_range_are_invalid(limits: JsonLimits) -> None:
    big = "[" + long("1") + ", 99999999999999999999]"
    with pytest.raises(InvalidInputError):
        request_from_rest(body("INT64", [41], big), "m", None, limits)
    with pytest.raises(InvalidInputError):
        request_from_rest(body("UINT8", [41], "[" + long("1") + ", 256]"), "m", None, limits)
    text = "[" + long("1") + ", 18446744073709551615]"
    ok = request_from_rest(body("UINT64", [41], text), "m", None, limits)
    assert ok.inputs[0].data[-1] == 2**64 - 1


def test_a_stand_in_cannot_be_forged_or_reused() -> None:
    """Cut arrays are named by a random nonce, and each name is good once."""
    text = "[" + long("1.5") + "]"
    doc = parse_infer_json(body("FP32", [40], text), CUT)
    data = doc["inputs"][0]["data"]
    assert isinstance(data, NumericText) and data.count == 40
    forged = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": "\x00fogline-tensor-0"}]
    }
    with pytest.raises(InvalidInputError, match="must be a list"):
        request_from_rest(json.dumps(forged).encode(), "m")


def test_value_count_is_bounded_before_parsing() -> None:
    doc = {"inputs": [], "parameters": {"p": list(range(2000))}}
    with pytest.raises(PayloadTooLargeError):
        parse_infer_json(json.dumps(doc).encode(), JsonLimits(max_values=1000))


@pytest.mark.parametrize("array", [np.arange(200_000, dtype=np.float32), np.array([True, False])])
def test_dumps_v2_writes_arrays_in_slices(array: np.ndarray) -> None:
    doc: dict[str, Any] = {"outputs": [{"name": "y", "datatype": "FP32", "data": array}]}
    assert json.loads(dumps_v2(doc))["outputs"][0]["data"] == array.tolist()
    doc = {"outputs": [{"name": "y", "data": np.array([1.0, np.nan])}]}
    with pytest.raises(ValueError):
        dumps_v2(doc)
