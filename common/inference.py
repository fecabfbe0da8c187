"""The one inference data type, and its V2 (Open Inference Protocol) JSON codec.

Every transport converts to and from these types at its edge: HTTP here
(``from_rest`` / ``to_rest``), ONNX Runtime in the runtime backends.
Fogline's own fields travel in ``parameters`` under the ``fogline.`` prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import InvalidInputError, PayloadTooLargeError
from common.tensor_json import JsonLimits, NumericText, parse_infer_json

# V2 datatype name <-> numpy dtype.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}
# NOTE: BYTES (strings, e.g. text to tokenise) is no numeric dtype: a BYTES tensor's
# data is an object array of ``bytes``, made only by ``bytes_array``.
BYTES = "BYTES"

# Keys of the ``parameters`` Fogline adds to responses (and reads from requests).
SERVED_BY = "fogline.served_by"  # "edge" | "cloud"
MODEL_VERSION = "fogline.model_version"
ESCALATION_REASON = "fogline.escalation_reason"  # uncertain|heavy|load|forced|no_local_model
DEGRADED = "fogline.degraded"  # True when the cloud was wanted but did not answer
DEGRADED_REASON = "fogline.degraded_reason"  # why: cloud_unavailable | cloud_too_large | ...
ROUTE = "fogline.route"  # request hint: "auto" (default) | "local" | "cloud"
UNCERTAINTY = "fogline.uncertainty"

MAX_DIMS = 32  # dimensions of one tensor
DEFAULT_LIMITS = JsonLimits()


@dataclass
class Tensor:
    name: str
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def datatype(self) -> str:
        if self.data.dtype == object:
            return BYTES
        try:
            return NUMPY_TO_V2[self.data.dtype]
        except KeyError:
            raise InvalidInputError(
                f"tensor {self.name!r}: unsupported dtype {self.data.dtype}"
            ) from None

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)


@dataclass
class InferRequest:
    model: str
    inputs: list[Tensor]
    id: str | None = None
    version: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None  # requested output names; None means all


@dataclass
class InferResponse:
    model: str
    outputs: list[Tensor]
    id: str | None = None
    version: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> Tensor:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(name)


class ElementBudget:
    """Counts tensor elements across one request against ``max_elements``."""

    def __init__(self, max_elements: int) -> None:
        self.left = max_elements
        self.limit = max_elements

    def take(self, n: int, where: str) -> None:
        if n > self.left:
            raise PayloadTooLargeError(
                f"{where}: request holds more than {self.limit} tensor elements"
            )
        self.left -= n


def _tensor_from_rest(obj: Any, where: str, budget: ElementBudget) -> Tensor:
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{where}: each tensor must be a JSON object")
    try:
        name, datatype, shape, data = obj["name"], obj["datatype"], obj["shape"], obj["data"]
    except KeyError as exc:
        raise InvalidInputError(f"{where}: tensor is missing field {exc.args[0]!r}") from None
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"{where}: tensor name must be a non-empty string")
    if not isinstance(datatype, str) or (datatype not in V2_TO_NUMPY and datatype != BYTES):
        raise InvalidInputError(f"{where}: tensor {name!r} has unsupported datatype {datatype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidInputError(
            f"{where}: tensor {name!r} shape must be a list of at most {MAX_DIMS} integers >= 0"
        )
    expected = math.prod(shape)  # exact: np.prod would wrap around on huge shapes
    budget.take(expected, f"{where}: tensor {name!r} shape {shape}")  # before any array exists
    if datatype == BYTES:
        array = bytes_array(data, expected, f"{where}: tensor {name!r}")
    else:
        array = _array_of(data, V2_TO_NUMPY[datatype], expected, f"{where}: tensor {name!r}")
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInputError(f"{where}: tensor {name!r} parameters must be an object")
    try:
        return Tensor(name, array.reshape(shape), params)
    except ValueError as exc:  # e.g. [0, 2**70]: zero elements, but a dimension numpy refuses
        raise InvalidInputError(f"{where}: tensor {name!r} shape {shape}: {exc}") from None


def _array_of(data: Any, dtype: np.dtype, expected: int, where: str) -> np.ndarray:
    """``data`` as a flat array of ``dtype`` holding ``expected`` elements, or a clear error.

    Counts are compared before conversion where they are known (binary bytes, cut
    JSON text), so a mismatched body never gets its tensor built.
    """
    if isinstance(data, np.ndarray | NumericText):  # binary extension | numeric JSON text
        count = data.size if isinstance(data, np.ndarray) else data.count
        if count != expected:
            raise InvalidInputError(f"{where} has {count} elements, its shape needs {expected}")
    # A bare null would become NaN.
    elif not isinstance(data, list):
        raise InvalidInputError(f"{where} data must be a list")
    try:
        if isinstance(data, NumericText):
            array = data.to_array(dtype)
        else:
            with np.errstate(over="raise"):  # 1e300 as FP32 is an error, not a silent inf
                array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError, FloatingPointError) as exc:
        raise InvalidInputError(f"{where} data is not {NUMPY_TO_V2[dtype]}: {exc}") from None
    if array.size != expected:
        raise InvalidInputError(f"{where} has {array.size} elements, its shape needs {expected}")
    if dtype.kind == "f" and not isinstance(data, np.ndarray) and not np.isfinite(array).all():
        raise InvalidInputError(f"{where} data holds a number out of range for {dtype}")
    return array


def bytes_array(data: Any, expected: int, where: str) -> np.ndarray:
    """A BYTES tensor's elements as a flat object array of ``bytes``.

    ``data`` is a JSON list (nested lists allowed, as V2 permits) of strings,
    which become UTF-8, or a list of ``bytes`` (the binary extension's elements).
    """
    if not isinstance(data, list):
        raise InvalidInputError(f"{where} data must be a list of strings")
    flat: list[bytes] = []
    stack: list[Any] = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) > MAX_DIMS:
                raise InvalidInputError(f"{where} data is nested too deeply")
            stack.append(iter(item))
        elif isinstance(item, str):
            flat.append(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, bytes):
            flat.append(item)
        else:
            raise InvalidInputError(f"{where} data holds {type(item).__name__}, not a string")
        if len(flat) > expected:
            break
    if len(flat) != expected:
        raise InvalidInputError(
            f"{where} has {len(flat)} or more elements, its shape needs {expected}"
        )
    array = np.empty(expected, dtype=object)
    array[:] = flat
    return array


_END = object()


def _bytes_to_rest(data: np.ndarray, name: str) -> list[str]:
    """JSON carries text: BYTES elements must be UTF-8 to travel as JSON strings."""
    try:
        return [bytes(b).decode("utf-8") for b in data.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidInputError(
            f"tensor {name!r}: an element is not UTF-8 text, which JSON cannot carry; "
            "send it with the binary tensor extension"
        ) from None


def _tensor_to_rest(t: Tensor, raw: bool = False) -> dict[str, Any]:
    """The REST form; ``raw`` leaves the data an ndarray, for ``tensor_json.dumps_v2``."""
    if t.data.dtype == object:
        data: Any = _bytes_to_rest(t.data, t.name)
    else:
        data = t.data if raw else t.data.reshape(-1).tolist()
    out: dict[str, Any] = {
        "name": t.name,
        "datatype": t.datatype,
        "shape": t.shape,
        "data": data,
    }
    if t.parameters:
        out["parameters"] = t.parameters
    return out


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInputError(f"{where}: parameters must be a JSON object")
    return params


def request_from_rest(
    body: bytes | str | dict[str, Any],
    model: str,
    version: str | None = None,
    limits: JsonLimits = DEFAULT_LIMITS,
) -> InferRequest:
    """Parse a V2 REST infer request body; raise InvalidInputError on any defect."""
    obj = _load_json(body, limits)
    budget = ElementBudget(limits.max_elements)
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError("request: 'inputs' must be a non-empty list")
    outputs = obj.get("outputs")
    names: list[str] | None = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
        ):
            raise InvalidInputError("request: 'outputs' must be a list of {\"name\": ...}")
        names = [o["name"] for o in outputs]
    req_id = obj.get("id")
    return InferRequest(
        model=model,
        version=version,
        id=str(req_id) if req_id is not None else None,
        inputs=[_tensor_from_rest(t, f"inputs[{i}]", budget) for i, t in enumerate(inputs)],
        parameters=_parameters(obj, "request"),
        outputs=names,
    )


def request_to_rest(req: InferRequest) -> dict[str, Any]:
    out: dict[str, Any] = {"inputs": [_tensor_to_rest(t) for t in req.inputs]}
    if req.id is not None:
        out["id"] = req.id
    if req.parameters:
        out["parameters"] = req.parameters
    if req.outputs is not None:
        out["outputs"] = [{"name": n} for n in req.outputs]
    return out


def response_to_rest(resp: InferResponse, raw: bool = False) -> dict[str, Any]:
    """The REST document; ``raw`` keeps tensor data as ndarrays (see ``dumps_v2``)."""
    out: dict[str, Any] = {
        "model_name": resp.model,
        "outputs": [_tensor_to_rest(t, raw) for t in resp.outputs],
    }
    if resp.version is not None:
        out["model_version"] = resp.version
    if resp.id is not None:
        out["id"] = resp.id
    if resp.parameters:
        out["parameters"] = resp.parameters
    return out


def response_from_rest(
    body: bytes | str | dict[str, Any], limits: JsonLimits = DEFAULT_LIMITS
) -> InferResponse:
    obj = _load_json(body, limits)
    budget = ElementBudget(limits.max_elements)
    outputs = obj.get("outputs")
    if not isinstance(obj.get("model_name"), str) or not isinstance(outputs, list):
        raise InvalidInputError("response: needs 'model_name' and a list of 'outputs'")
    return InferResponse(
        model=obj["model_name"],
        version=obj.get("model_version"),
        id=obj.get("id"),
        outputs=[_tensor_from_rest(t, f"outputs[{i}]", budget) for i, t in enumerate(outputs)],
        parameters=_parameters(obj, "response"),
    )


def _load_json(body: bytes | str | dict[str, Any], limits: JsonLimits) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    return parse_infer_json(body.encode() if isinstance(body, str) else body, limits)
