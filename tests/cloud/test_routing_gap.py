"""``threshold_for_gap``: the fewest escalations that keep a cascade within a gap."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.pipeline.routing import threshold_for_gap
from common.errors import InvalidInputError


def _gap(scores, edge, cloud, threshold) -> float:
    hybrid = np.where(scores > threshold, cloud, edge)
    return float(np.mean(cloud) - np.mean(hybrid))


def test_escalates_just_the_rows_the_edge_gets_wrong_when_they_score_highest() -> None:
    scores = np.array([0.9, 0.8, 0.1, 0.05, 0.01])
    edge = np.array([0, 0, 1, 1, 1])
    cloud = np.ones(5)
    t = threshold_for_gap(scores, edge, cloud, 0.0)
    assert (scores > t).sum() == 2
    assert _gap(scores, edge, cloud, t) == 0.0
    # A gap of one row in five lets one of the two stay local.
    t = threshold_for_gap(scores, edge, cloud, 0.2)
    assert (scores > t).sum() == 1


def test_no_escalation_when_the_edge_is_as_good() -> None:
    scores = np.array([0.5, 0.4, 0.3])
    assert threshold_for_gap(scores, np.ones(3), np.ones(3), 0.0) == 1.0


def test_ties_are_escalated_together() -> None:
    scores = np.array([0.7, 0.7, 0.1])
    t = threshold_for_gap(scores, np.array([0, 1, 1]), np.ones(3), 0.0)
    assert (scores > t).sum() == 2


@pytest.mark.parametrize("seed", range(5))
def test_meets_the_gap_with_the_fewest_escalations_on_random_rows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.random(200)
    edge = (rng.random(200) > scores * 0.5).astype(int)  # less sure, more often wrong
    cloud = (rng.random(200) > 0.05).astype(int)
    t = threshold_for_gap(scores, edge, cloud, 0.005)
    assert _gap(scores, edge, cloud, t) <= 0.005 + 1e-12
    fewer = np.sort(scores)[::-1][(scores > t).sum() - 1]  # keep one more row local
    if (scores > t).sum() > 0:
        assert _gap(scores, edge, cloud, fewer) > 0.005


def test_refuses_mismatched_rows_and_negative_gaps() -> None:
    with pytest.raises(InvalidInputError):
        threshold_for_gap(np.ones(3), np.ones(2), np.ones(3), 0.0)
    with pytest.raises(InvalidInputError):
        threshold_for_gap(np.ones(3), np.ones(3), np.ones(3), -0.1)
