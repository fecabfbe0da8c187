"""The V2 binary tensor extension: a JSON header followed by raw little-endian tensors.

``Inference-Header-Content-Length`` gives the JSON header's size; tensors that
carry ``binary_data_size`` take their bytes, in order, from what follows.
tritonclient sends this by default, so it must work for "standard clients
work unchanged".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from common.errors import InvalidInputError
from common.inference import (
    V2_TO_NUMPY,
    InferRequest,
    InferResponse,
    Tensor,
    request_from_rest,
    response_to_rest,
)
from common.json_object import parse_json_object

BINARY_HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class BinaryOutputs:
    """Which outputs the client wants as raw bytes (``binary_data`` parameters)."""

    default: bool = False
    per_output: dict[str, bool] = field(default_factory=dict)

    def wants(self, name: str) -> bool:
        return self.per_output.get(name, self.default)


def decode_infer_request(
    body: bytes, header_length: int | None, model: str, version: str | None
) -> tuple[InferRequest, BinaryOutputs]:
    """Parse a V2 infer body: JSON, or a JSON header followed by binary tensor data."""
    if header_length is not None and header_length > len(body):
        raise InvalidInputError(f"{BINARY_HEADER} is {header_length}, the body {len(body)} bytes")
    head = body if header_length is None else body[:header_length]
    obj = parse_json_object(head, "body")
    if header_length is not None:
        _attach_binary_inputs(obj, body[header_length:])
    binary = _binary_outputs(obj)
    return request_from_rest(obj, model, version), binary


def _attach_binary_inputs(obj: dict[str, Any], blob: bytes) -> None:
    """Replace each ``binary_data_size`` input's data with its slice of ``blob``."""
    offset = 0
    inputs = obj.get("inputs")
    for i, t in enumerate(inputs if isinstance(inputs, list) else []):
        params = t.get("parameters") if isinstance(t, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        size = params.pop("binary_data_size")
        datatype = t.get("datatype")
        dtype = V2_TO_NUMPY.get(datatype) if isinstance(datatype, str) else None
        if dtype is None or not isinstance(size, int) or size < 0 or offset + size > len(blob):
            raise InvalidInputError(f"inputs[{i}]: bad binary_data_size or datatype")
        if size % dtype.itemsize:
            raise InvalidInputError(
                f"inputs[{i}]: {size} bytes is not a whole number of {datatype}"
            )
        t["data"] = np.frombuffer(blob, dtype.newbyteorder("<"), size // dtype.itemsize, offset)
        offset += size
    if offset != len(blob):
        raise InvalidInputError(f"{len(blob) - offset} bytes of binary data belong to no input")


def _binary_outputs(obj: dict[str, Any]) -> BinaryOutputs:
    """Read (and take out) the binary-output wishes: they are about this hop only.

    NOTE: ``binary_data_output`` must not reach the runtime; the router would
    forward it to the cloud, which would then answer in binary to a JSON client.
    """
    params = obj.get("parameters")
    default = isinstance(params, dict) and params.pop("binary_data_output", False) is True
    per_output: dict[str, bool] = {}
    outputs = obj.get("outputs")
    for o in outputs if isinstance(outputs, list) else []:
        o_params = o.get("parameters") if isinstance(o, dict) else None
        wish = o_params.get("binary_data") if isinstance(o_params, dict) else None
        if isinstance(wish, bool) and isinstance(o.get("name"), str):
            per_output[o["name"]] = wish
    return BinaryOutputs(default, per_output)


def encode_infer_response(
    response: InferResponse, binary: BinaryOutputs
) -> tuple[bytes, int | None]:
    """The body, and the JSON header's length when outputs are sent as binary."""
    wanted = [t for t in response.outputs if binary.wants(t.name)]
    if not wanted:
        return json.dumps(response_to_rest(response)).encode(), None
    as_json = iter(
        response_to_rest(
            replace(response, outputs=[t for t in response.outputs if not binary.wants(t.name)])
        )["outputs"]
    )
    doc = response_to_rest(replace(response, outputs=[]))
    blobs = [np.ascontiguousarray(t.data, t.data.dtype.newbyteorder("<")).tobytes() for t in wanted]
    sizes = iter(len(b) for b in blobs)
    doc["outputs"] = [
        _binary_entry(t, next(sizes)) if binary.wants(t.name) else next(as_json)
        for t in response.outputs
    ]
    header = json.dumps(doc).encode()
    return header + b"".join(blobs), len(header)


def _binary_entry(t: Tensor, size: int) -> dict[str, Any]:
    params = {**t.parameters, "binary_data_size": size}
    return {"name": t.name, "datatype": t.datatype, "shape": t.shape, "parameters": params}


# --- HTTP ------------------------------------------------------------------------------
