"""The demos' answer bookkeeping (``PhaseResult.record``), shared by the digits and MiniLM demos."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from common.inference import (
    DEGRADED,
    ESCALATION_REASON,
    SERVED_BY,
    InferResponse,
    Tensor,
    response_to_rest,
)
from fogline.traffic import PhaseResult


def _body(**parameters: Any) -> bytes:
    out = Tensor("probabilities", np.array([[0.1, 0.9]], np.float32))
    return json.dumps(response_to_rest(InferResponse("m", [out], parameters=parameters))).encode()


@pytest.mark.parametrize(
    ("status", "parameters", "where", "reasons", "degraded"),
    [
        (200, {}, "edge", {}, 0),  # no served_by: the agent answered itself
        (200, {SERVED_BY: "edge"}, "edge", {}, 0),
        (200, {SERVED_BY: "cloud", ESCALATION_REASON: "uncertain"}, "cloud", {"uncertain": 1}, 0),
        (200, {ESCALATION_REASON: "heavy", DEGRADED: True}, "edge", {"heavy": 1}, 1),
        (503, {}, None, {}, 0),
        (413, {}, None, {}, 0),
    ],
)
def test_record_counts_where_why_and_how_it_came(
    status: int,
    parameters: dict[str, Any],
    where: str | None,
    reasons: dict[str, int],
    degraded: int,
) -> None:
    result = PhaseResult()
    answer = result.record(status, _body(**parameters), 2.5, samples=3)
    assert (result.requests, result.samples, result.statuses) == (1, 3, {status: 1})
    assert result.reasons == reasons and result.degraded == degraded
    if where is None:
        assert answer is None and result.errors == 1
        assert result.latency_ms == {"edge": [], "cloud": []}
    else:
        assert answer is not None and result.errors == 0
        assert answer.output("probabilities").data.argmax() == 1
        assert result.latency_ms[where] == [2.5]
        assert result.escalated_fraction == (1.0 if where == "cloud" else 0.0)
