"""The V2 binary tensor extension: a JSON header followed by raw little-endian tensors.

``Inference-Header-Content-Length`` gives the JSON header's size; tensors that
carry ``binary_data_size`` take their bytes, in order, from what follows.
tritonclient sends this by default, so it must work for "standard clients
work unchanged".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from common.errors import InvalidInputError, NonFiniteOutputError
from common.inference import (
    BYTES,
    DEFAULT_LIMITS,
    V2_TO_NUMPY,
    InferRequest,
    InferResponse,
    Tensor,
    request_from_rest,
    request_to_rest,
    response_from_rest,
    response_to_rest,
)
from common.tensor_json import JsonLimits, dumps_v2, parse_infer_json

BINARY_HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class BinaryOutputs:
    """Which outputs the client wants as raw bytes (``binary_data`` parameters)."""

    default: bool = False
    per_output: dict[str, bool] = field(default_factory=dict)

    def wants(self, name: str) -> bool:
        return self.per_output.get(name, self.default)


def decode_infer_request(
    body: bytes,
    header_length: int | None,
    model: str,
    version: str | None,
    limits: JsonLimits = DEFAULT_LIMITS,
) -> tuple[InferRequest, BinaryOutputs]:
    """Parse a V2 infer body: JSON, or a JSON header followed by binary tensor data."""
    obj = _split(body, header_length, "inputs", limits)
    binary = _binary_outputs(obj)
    return request_from_rest(obj, model, version, limits), binary


def decode_infer_response(
    body: bytes, header_length: int | None, limits: JsonLimits = DEFAULT_LIMITS
) -> InferResponse:
    """Parse a V2 infer answer, JSON or binary (what the agent gets back from the cloud)."""
    return response_from_rest(_split(body, header_length, "outputs", limits), limits)


def _split(
    body: bytes, header_length: int | None, field: str, limits: JsonLimits
) -> dict[str, Any]:
    """The JSON header as an object, each binary tensor's bytes attached as its data."""
    if header_length is not None and header_length > len(body):
        raise InvalidInputError(f"{BINARY_HEADER} is {header_length}, the body {len(body)} bytes")
    head = body if header_length is None else body[:header_length]
    obj = parse_infer_json(head, limits)
    if header_length is not None:
        # memoryview: the tensors are views of the body, never copies of it.
        _attach_binary(obj, field, memoryview(body)[header_length:])
    return obj


def _attach_binary(obj: dict[str, Any], field: str, blob: memoryview) -> None:
    """Replace each ``binary_data_size`` tensor's data with its slice of ``blob``."""
    offset = 0
    tensors = obj.get(field)
    for i, t in enumerate(tensors if isinstance(tensors, list) else []):
        params = t.get("parameters") if isinstance(t, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        size = params.pop("binary_data_size")
        datatype = t.get("datatype")
        if datatype == BYTES and isinstance(size, int) and 0 <= size <= len(blob) - offset:
            t["data"] = _bytes_elements(blob[offset : offset + size], f"{field}[{i}]")
            offset += size
            continue
        dtype = V2_TO_NUMPY.get(datatype) if isinstance(datatype, str) else None
        if dtype is None or not isinstance(size, int) or size < 0 or offset + size > len(blob):
            raise InvalidInputError(f"{field}[{i}]: bad binary_data_size or datatype")
        if size % dtype.itemsize:
            raise InvalidInputError(
                f"{field}[{i}]: {size} bytes is not a whole number of {datatype}"
            )
        t["data"] = np.frombuffer(blob, dtype.newbyteorder("<"), size // dtype.itemsize, offset)
        offset += size
    if offset != len(blob):
        raise InvalidInputError(f"{len(blob) - offset} bytes of binary data belong to no input")


def _bytes_elements(blob: memoryview, where: str) -> list[bytes]:
    """BYTES in the binary extension: each element a 4-byte little-endian length, then bytes."""
    out: list[bytes] = []
    pos = 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise InvalidInputError(f"{where}: BYTES data ends inside an element's length")
        length = int.from_bytes(blob[pos : pos + 4], "little")
        pos += 4
        if pos + length > len(blob):
            raise InvalidInputError(f"{where}: BYTES element of {length} bytes overruns its data")
        out.append(bytes(blob[pos : pos + length]))
        pos += length
    return out


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
        return _dumps(response_to_rest(response, raw=True)), None
    as_json = iter(
        response_to_rest(
            replace(response, outputs=[t for t in response.outputs if not binary.wants(t.name)]),
            raw=True,
        )["outputs"]
    )
    doc = response_to_rest(replace(response, outputs=[]))
    blobs = [_le_bytes(t.data) for t in wanted]
    sizes = iter(len(b) for b in blobs)
    doc["outputs"] = [
        _binary_entry(t, next(sizes)) if binary.wants(t.name) else next(as_json)
        for t in response.outputs
    ]
    header = _dumps(doc)
    return header + b"".join(blobs), len(header)


def encode_infer_request(request: InferRequest) -> tuple[bytes, int]:
    """The binary form of ``request`` (every input as raw bytes), and its header's length.

    What the agent sends the cloud: about 5x smaller than JSON numbers, and no
    Python float per element on the way. It asks for binary outputs back.
    """
    doc = request_to_rest(replace(request, inputs=[]))
    blobs = [_le_bytes(t.data) for t in request.inputs]
    doc["inputs"] = [_binary_entry(t, len(b)) for t, b in zip(request.inputs, blobs, strict=True)]
    doc["parameters"] = {**doc.get("parameters", {}), "binary_data_output": True}
    header = _dumps(doc)
    return header + b"".join(blobs), len(header)


def _le_bytes(data: np.ndarray) -> bytes:
    if data.dtype == object:  # BYTES: length-prefixed elements
        return b"".join(len(b).to_bytes(4, "little") + bytes(b) for b in data.reshape(-1))
    return np.ascontiguousarray(data, data.dtype.newbyteorder("<")).tobytes()


def _dumps(doc: dict[str, Any]) -> bytes:
    try:
        return dumps_v2(doc)
    except ValueError:
        raise NonFiniteOutputError(
            "the answer holds NaN or infinity, which JSON cannot carry; "
            "ask for binary outputs (binary_data_output) to receive them"
        ) from None


def _binary_entry(t: Tensor, size: int) -> dict[str, Any]:
    params = {**t.parameters, "binary_data_size": size}
    return {"name": t.name, "datatype": t.datatype, "shape": t.shape, "parameters": params}
