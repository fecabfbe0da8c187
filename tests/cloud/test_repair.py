"""Repair decisions as tables: request parsing, token buckets, resend planning."""

from __future__ import annotations

import json
import math

import pytest

from cloud.repair import (
    RepairLimiter,
    RepairPolicy,
    RepairRequest,
    parse_request,
    plan_resend,
    refill,
)
from common.errors import InvalidInputError


def _req(missing: object, device_id: object = "dev-1") -> bytes:
    return json.dumps({"device_id": device_id, "missing": missing}).encode()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (_req([3, 1, 3, 0]), RepairRequest("dev-1", (0, 1, 3))),  # sorted, distinct
        (_req([]), RepairRequest("dev-1", ())),
        (_req(list(range(10))), RepairRequest("dev-1", tuple(range(10)))),
    ],
)
def test_parse_request_accepts(payload: bytes, expected: RepairRequest) -> None:
    assert parse_request(payload, count=10, max_bytes=1000) == expected


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"x" * 1001, "1001 bytes"),  # refused before parsing
        (b"[1, 2]", "JSON object"),
        (b"{not json", "not valid JSON"),
        (_req([1], device_id="../evil"), "device id"),
        (_req([1], device_id=None), "device id"),
        (_req("0-9"), "list"),
        (_req(list(range(11))), "at most 10"),  # more than the artifact has
        (_req([10]), "outside"),
        (_req([-1]), "outside"),
        (_req([True]), "outside"),
        (_req([1.5]), "outside"),
        (_req(["1"]), "outside"),
    ],
)
def test_parse_request_refuses(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_request(payload, count=10, max_bytes=1000)


@pytest.mark.parametrize(
    ("tokens", "elapsed", "rate", "burst", "expected"),
    [
        (0.0, 1.0, 0.5, 2.0, 0.5),
        (0.0, 10.0, 0.5, 2.0, 2.0),  # never above the burst
        (1.0, -5.0, 0.5, 2.0, 1.0),  # a clock going back adds nothing
        (2.0, 0.0, 0.5, 2.0, 2.0),
    ],
)
def test_refill(tokens, elapsed, rate, burst, expected) -> None:
    assert refill(tokens, elapsed, rate, burst) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("missing", "last_sent", "now", "expected"),
    [
        ([0, 1, 2], {}, 0.0, [0, 1, 2]),  # never sent: all of them
        ([0, 1, 2], {1: 9.5}, 10.0, [0, 2]),  # sent half a second ago: not again
        ([0, 1, 2], {1: 9.0}, 10.0, [0, 1, 2]),  # a second ago: again
        ([], {0: -math.inf}, 0.0, []),
    ],
)
def test_plan_resend(missing, last_sent, now, expected) -> None:
    assert plan_resend(missing, last_sent, now, min_interval_s=1.0) == expected


def test_device_bucket_allows_a_burst_then_its_rate() -> None:
    limiter = RepairLimiter(RepairPolicy(device_burst=2, device_rate=0.2))
    assert [limiter.admit_device("d", 0.0) for _ in range(3)] == [True, True, False]
    assert not limiter.admit_device("d", 4.0)  # 0.8 of a token
    assert limiter.admit_device("d", 5.0)
    assert limiter.admit_device("other", 5.0)  # each claimed id has its own bucket


def test_device_buckets_are_bounded() -> None:
    limiter = RepairLimiter(RepairPolicy(device_burst=1, device_rate=0.0, max_tracked_devices=2))
    for d in ("a", "b", "c"):
        assert limiter.admit_device(d, 0.0)
    assert len(limiter._devices) == 2
    assert not limiter.admit_device("c", 0.0)


def test_each_chunk_goes_out_once_per_second_however_many_ask() -> None:
    limiter = RepairLimiter(RepairPolicy())
    assert limiter.plan("a", 4, [0, 1, 2, 3], now=0.0) == [0, 1, 2, 3]
    assert limiter.plan("a", 4, [0, 1, 2, 3], now=0.5) == []
    assert limiter.plan("b", 4, [0, 1], now=0.5) == [0, 1]  # per artifact
    assert limiter.plan("a", 4, [2, 3], now=1.0) == [2, 3]


def test_artifact_budget_caps_what_invented_device_ids_can_cost() -> None:
    """Every request from a fresh id passes its device bucket; the artifact's budget
    (two artifacts' worth, then one per 10 s) still bounds the chunks resent."""
    limiter = RepairLimiter(RepairPolicy(artifact_burst=2, artifact_rate=0.1))
    sent = 0
    for second in range(10):
        assert limiter.admit_device(f"fake-{second}", float(second))
        sent += len(limiter.plan("a", 100, range(100), now=float(second)))
    assert sent == 2 * 100 + 90  # the burst, then 10 chunks/s for the 9 seconds after
