"""Where a model version came from: its parent version, the method and its parameters.

The ``lineage`` object of a manifest is signed with the rest of it, so a
device, an operator and the registry all see the same history. It is
optional: manifests signed before it (or models trained from scratch with no
record) stay valid. Everything in it is checked here, strictly, because the
registry turns ``parent`` into a database key and prints ``params``.

The figures of a version live in the manifest's ``evaluation`` under the
names below (quality under its metric's own name: ``accuracy`` or
``mean_cosine``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidInputError
from common.names import check_digest, check_name

# NOTE: the metric names a version's ``evaluation`` carries, besides its quality.
LATENCY_P50_MS_B1 = "latency_p50_ms_b1"
THROUGHPUT_B32 = "throughput_b32"
SIZE_BYTES = "size_bytes"
QUALITY_METRICS = ("accuracy", "mean_cosine", "r2")  # as cloud.pipeline.quality names them

MAX_PARAMS = 32
MAX_PARAMS_BYTES = 4096  # serialized: a record, not a payload
MAX_TEXT = 256
# "int8-static-qdq", "prune-structured-30%", "distill": a label, never a path.
_METHOD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}")
_KEYS = {"parent", "method", "params", "parent_sha256"}


def parent_ref(name: str, version: str) -> str:
    return f"{check_name(name, 'model name')}:{check_name(version, 'model version')}"


def parse_ref(ref: object, what: str = "parent") -> tuple[str, str]:
    """``NAME:VERSION`` as (name, version), each a checked name; InvalidInputError else."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        shown = ref[:80] if isinstance(ref, str) else type(ref).__name__
        raise InvalidInputError(f"{what} must be NAME:VERSION, got {shown!r}")
    name, version = ref.split(":")
    return check_name(name, f"{what} model name"), check_name(version, f"{what} version")


def check_method(value: object) -> str:
    if not isinstance(value, str) or not _METHOD.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise InvalidInputError(
            f"invalid lineage method {shown!r}: 1-64 of A-Z a-z 0-9 . _ % + -, "
            "e.g. train, int8-static-qdq, prune-structured-30%, distill"
        )
    return value


def is_finite_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) < 1e300
    )


def _check_param_value(key: str, value: object) -> None:
    if value is None or isinstance(value, bool) or is_finite_number(value):
        return
    if isinstance(value, str) and len(value) <= MAX_TEXT:
        return
    if isinstance(value, list) and len(value) <= 64:
        for item in value:
            if isinstance(item, list | dict):
                raise InvalidInputError(f"lineage param {key!r}: lists hold plain values only")
            _check_param_value(key, item)
        return
    raise InvalidInputError(
        f"lineage param {key!r} must be a finite number, a string of at most {MAX_TEXT} "
        "characters, true/false/null or a short list of those"
    )


def check_params(params: object) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise InvalidInputError("lineage params must be an object")
    if len(params) > MAX_PARAMS:
        raise InvalidInputError(f"lineage params: at most {MAX_PARAMS} entries")
    for key, value in params.items():
        check_name(key, "lineage param name")
        _check_param_value(key, value)
    if len(json.dumps(params)) > MAX_PARAMS_BYTES:
        raise InvalidInputError(f"lineage params: at most {MAX_PARAMS_BYTES} bytes of JSON")
    return params


@dataclass(frozen=True)
class Lineage:
    method: str
    parent: str | None = None  # "name:version", None for a root (trained from scratch)
    params: dict[str, Any] = field(default_factory=dict)
    parent_sha256: str | None = None  # the parent's model file this one was made from

    def validate(self) -> None:
        check_method(self.method)
        if self.parent is not None:
            parse_ref(self.parent)
        check_params(self.params)
        if self.parent_sha256 is not None:
            check_digest(self.parent_sha256, "lineage parent_sha256")

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"parent": self.parent, "method": self.method}
        doc["params"] = self.params
        if self.parent_sha256 is not None:
            doc["parent_sha256"] = self.parent_sha256
        return doc

    @classmethod
    def from_dict(cls, doc: object) -> Lineage:
        if not isinstance(doc, dict):
            raise InvalidInputError("malformed manifest: 'lineage' must be an object")
        unknown = set(doc) - _KEYS
        if unknown or "method" not in doc:
            raise InvalidInputError(
                f"malformed manifest: 'lineage' takes {sorted(_KEYS)} with 'method' "
                f"required (got {sorted(map(str, doc))[:8]})"
            )
        out = cls(
            method=doc["method"],
            parent=doc.get("parent"),
            params=doc.get("params", {}),
            parent_sha256=doc.get("parent_sha256"),
        )
        out.validate()
        return out
