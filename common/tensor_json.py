"""V2 JSON bodies whose tensor data goes straight into numpy, not into Python floats.

``json.loads`` turns each number into a Python float in a list (about 32 bytes
an element): a 58 MB request once took 6.5 GB. Here every ``"data": [...]``
array made only of numbers and brackets is cut out of the text before
``json.loads`` sees it, checked (brackets balanced and in place, nesting
bounded), and later read by numpy's C parser straight into the tensor's dtype.
What remains is parsed as ordinary JSON, with its size bounded first (a count
of commas bounds the number of values it can hold).

Cutting is only a faster road to the same meaning: an array that fails any
check is left in place for ``json.loads`` to judge, and the stand-in string
carries a random nonce, so a body cannot name another body's array.
Accepted leniency: numbers in cut arrays are read by ``strtod``, which also
takes ``+1``, ``.5`` and ``01``.
"""

from __future__ import annotations

import json
import re
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import InvalidInputError, PayloadTooLargeError
from common.json_object import MAX_DEPTH, dumps_strict, parse_json_object

_DATA_KEY = re.compile(rb'"data"[ \t\n\r]*:[ \t\n\r]*(?=\[)')
_RUN = re.compile(rb"[-+0-9.eE,\[\] \t\n\r]*")
_WS = b" \t\n\r"
_SCAN = 1 << 22  # bracket scan in slices, so its temporaries stay small
_OPEN, _CLOSE, _COMMA = ord("["), ord("]"), ord(",")
_DUMP_CHUNK = 1 << 16  # elements turned into Python numbers at a time when writing JSON


@dataclass(frozen=True)
class JsonLimits:
    """Bounds on one V2 JSON body."""

    max_depth: int = MAX_DEPTH
    max_elements: int = 16 << 20  # tensor elements in one request, all tensors together
    max_values: int = 1 << 20  # JSON values parsed as Python objects (outside cut arrays)
    # Data arrays with less text than this are left to ``json.loads``: their Python
    # objects are small, and cutting costs a fixed ~20 numpy calls, which is most of a
    # small request's decode (digits, 64 numbers: 3x slower cut; measured in bench.fallback).
    min_cut_bytes: int = 8 << 10


class NumericText:
    """A tensor's ``data`` array as checked JSON text, read into numpy on demand."""

    __slots__ = ("count", "flat")

    def __init__(self, text: bytes) -> None:
        self.flat = text.translate(None, b"[]")  # numbers, commas and whitespace only
        self.count = self.flat.count(b",") + 1  # exact: empty arrays are never cut

    def to_array(self, dtype: np.dtype) -> np.ndarray:
        """The numbers as a flat array of ``dtype``; InvalidInputError if they are not."""
        flat = self.flat
        kind = dtype.kind
        parse: np.dtype[Any]
        if kind == "f":
            parse = np.dtype(np.float32) if dtype == np.float32 else np.dtype(np.float64)
        else:
            parse = np.dtype(np.uint64) if dtype == np.uint64 else np.dtype(np.int64)
        array = _fromstring(flat, parse)
        if array.size != self.count:
            raise InvalidInputError("data is not a list of numbers")
        if kind == "f":
            return array.astype(dtype, copy=False)  # FP16 overflow: inf, refused by the caller
        info = np.iinfo(parse)  # type: ignore[type-var]
        if array.size and (array.min() == info.min or array.max() == info.max):
            # strtoll clamps what it cannot hold: let Python's ints say whether it fits.
            array = np.asarray([int(x) for x in flat.split(b",")], dtype=parse)
        if kind == "b":
            return array != 0
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InvalidInputError(f"data holds a value out of range for {dtype}")
        return array.astype(dtype, copy=False)


def _fromstring(flat: bytes, dtype: np.dtype) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return np.fromstring(flat, dtype=dtype, sep=",")  # type: ignore[call-overload,no-any-return]
    except (ValueError, DeprecationWarning) as exc:
        raise InvalidInputError(f"data is not a list of {dtype} numbers: {exc}") from None


def parse_infer_json(data: bytes, limits: JsonLimits, what: str = "body") -> dict[str, Any]:
    """Parse a V2 body; large numeric ``data`` arrays come back as ``NumericText``."""
    nonce = ""  # drawn at the first cut: os.urandom is a syscall, most bodies cut nothing
    arrays: dict[str, NumericText] = {}
    pieces: list[bytes] = []
    last = 0
    for match in _DATA_KEY.finditer(data):
        start = match.end()
        if start < last:
            continue
        text = _checked_array(data, start, limits)
        if text is None:
            continue
        nonce = nonce or f"\x00fogline-tensor-{secrets.token_hex(8)}-"
        key = nonce + str(len(arrays))
        arrays[key] = NumericText(text)
        pieces += [data[last:start], json.dumps(key).encode()]
        last = start + len(text)
    rest = b"".join([*pieces, data[last:]]) if arrays else data
    if rest.count(b",") >= limits.max_values:
        raise PayloadTooLargeError(
            f"{what} holds more than {limits.max_values} JSON values outside tensor data"
        )

    def resolve(obj: dict[str, Any]) -> dict[str, Any]:
        value = obj.get("data")
        if isinstance(value, str) and value in arrays:
            obj["data"] = arrays.pop(value)  # single use: a copied stand-in stays a string
        return obj

    return parse_json_object(
        rest, what, max_depth=limits.max_depth, object_hook=resolve if arrays else None
    )


def _checked_array(data: bytes, start: int, limits: JsonLimits) -> bytes | None:
    """The numeric array starting at ``start``, if it is one and worth cutting out."""
    run = _RUN.match(data, start)
    assert run is not None  # the pattern matches the empty string
    text = data[start : run.end()].rstrip(_WS + b",")
    if len(text) < limits.min_cut_bytes:
        return None
    bare = text.translate(None, _WS)
    return text if _well_formed(bare, limits.max_depth) else None


def _well_formed(bare: bytes, max_depth: int) -> bool:
    """Brackets of ``bare`` (no whitespace) balanced, within depth, each where JSON allows.

    Numbers and commas between them are checked later by numpy's parser; what it
    cannot see once brackets are gone (``[1][2]`` reading as ``12``) is checked here.
    """
    buf = np.frombuffer(bare, np.uint8)
    pos = _bracket_positions(buf)
    if pos.size < 2 or pos[0] != 0 or pos[-1] != buf.size - 1:
        return False
    opens = buf[pos] == _OPEN
    depth = np.cumsum(np.where(opens, 1, -1), dtype=np.int64)
    if depth[-1] != 0 or depth[:-1].min() < 1 or depth.max() > max_depth:
        return False
    after = buf[np.minimum(pos + 1, buf.size - 1)]
    before = buf[np.maximum(pos - 1, 0)]
    inner_close = ~opens & (pos != buf.size - 1)
    inner_open = opens & (pos != 0)
    return not (
        np.any(inner_close & (after != _COMMA) & (after != _CLOSE))  # ][  ]1
        or np.any(inner_open & (before != _COMMA) & (before != _OPEN))  # 1[
        or np.any(opens & ((after == _CLOSE) | (after == _COMMA)))  # []  [,
        or np.any(~opens & (before == _COMMA))  # ,]
    )


def _bracket_positions(buf: np.ndarray) -> np.ndarray:
    parts = []
    for off in range(0, buf.size, _SCAN):
        part = buf[off : off + _SCAN]
        parts.append(np.flatnonzero((part == _OPEN) | (part == _CLOSE)) + off)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def dumps_v2(doc: dict[str, Any]) -> bytes:
    """JSON bytes of a V2 document whose tensors' ``data`` may be ndarrays.

    An array is written a slice at a time, so no more than ``_DUMP_CHUNK``
    Python numbers exist at once (``tolist()`` of a whole answer once held
    millions). ValueError if any number is NaN or infinite: JSON has neither.
    """
    nonce = ""  # drawn only when an array is large enough to be written in slices
    arrays: dict[bytes, np.ndarray] = {}
    for field in ("inputs", "outputs"):
        for tensor in doc.get(field) or []:
            data = tensor.get("data")
            if isinstance(data, np.ndarray) and data.size <= _DUMP_CHUNK:
                tensor["data"] = data.reshape(-1).tolist()  # small: Python numbers at once
            elif isinstance(data, np.ndarray):
                nonce = nonce or f"\x00fogline-tensor-{secrets.token_hex(8)}-"
                stand_in = nonce + str(len(arrays))
                arrays[json.dumps(stand_in).encode()] = data.reshape(-1)
                tensor["data"] = stand_in
    text = dumps_strict(doc)
    for mark, array in arrays.items():
        before, after = text.split(mark)
        chunks = (
            dumps_strict(array[i : i + _DUMP_CHUNK].tolist())[1:-1]
            for i in range(0, array.size, _DUMP_CHUNK)
        )
        text = b"".join([before, b"[", b",".join(chunks), b"]", after])
    return text
