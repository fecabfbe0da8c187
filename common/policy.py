"""A served model's routing policy: what a signed ``set-policy`` command may change.

Shared by the control plane (which checks an operator's request before signing
it) and the agent (which checks the signed command again before applying it):
one parser, so both refuse the same things -- NaN, infinities, negatives, a
threshold above 1, unknown fields -- and a refused policy changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from common.errors import InvalidInputError

MAX_LATENCY_BUDGET_MS = 600_000.0  # ten minutes: anything above is a typo
MAX_BATCH = 1 << 20


@dataclass(frozen=True)
class ModelPolicy:
    """Per-model routing knobs; ``None`` keeps the package's routing hint.

    - ``uncertainty_threshold``: escalate a local answer whose score is above this (0..1)
    - ``latency_budget_ms``: expected local queue wait above this sends requests to the
      cloud (reason ``load``), while the cloud answers faster than the queue would
    - ``max_local_batch``: a request with more rows goes to the cloud (reason ``heavy``)
    """

    uncertainty_threshold: float | None = None
    latency_budget_ms: float | None = None
    max_local_batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def merged(self, changes: ModelPolicy) -> ModelPolicy:
        """This policy with every field ``changes`` sets replaced."""
        return replace(self, **changes.to_dict())


FIELDS = tuple(f.name for f in fields(ModelPolicy))


def parse_policy(doc: object) -> ModelPolicy:
    """A ``ModelPolicy`` from JSON, or InvalidInputError naming the first bad field."""
    if not isinstance(doc, dict):
        raise InvalidInputError("policy must be a JSON object")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise InvalidInputError(f"unknown policy fields {unknown}; known: {list(FIELDS)}")
    if not doc:
        raise InvalidInputError(f"policy sets nothing; give one of {list(FIELDS)}")
    threshold = _number(doc.get("uncertainty_threshold"), "uncertainty_threshold", 0.0, 1.0)
    budget = _number(doc.get("latency_budget_ms"), "latency_budget_ms", 0.0, MAX_LATENCY_BUDGET_MS)
    batch = doc.get("max_local_batch")
    if batch is not None and (
        not isinstance(batch, int) or isinstance(batch, bool) or not 0 <= batch <= MAX_BATCH
    ):
        raise InvalidInputError(f"max_local_batch must be an integer in 0..{MAX_BATCH}")
    return ModelPolicy(threshold, budget, batch)


def _number(value: object, name: str, low: float, high: float) -> float | None:
    if value is None:
        return None
    # NOTE: bool is an int; "0.5" is not a number; NaN fails every comparison, so test it.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number) or not low <= number <= high:
        raise InvalidInputError(f"{name} must be in {low:g}..{high:g}, got {value!r}")
    return number
