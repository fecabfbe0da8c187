"""Repair decisions as tables: request parsing, token buckets, resend planning."""

from __future__ import annotations

import json
import math

import pytest

from cloud.repair import (
    RepairLimiter,
    RepairPlan,
    RepairPolicy,
    RepairRequest,
    parse_request,
    plan_resend,
    refill,
    shared_enough,
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
    assert limiter.admit_device("other", 5.0)  # each device has its own bucket


def test_device_buckets_are_bounded() -> None:
    limiter = RepairLimiter(RepairPolicy(device_burst=1, device_rate=0.0, max_tracked_devices=2))
    for d in ("a", "b", "c"):
        assert limiter.admit_device(d, 0.0)
    assert len(limiter._devices) == 2
    assert not limiter.admit_device("c", 0.0)


def test_each_chunk_goes_to_a_device_at_most_once_per_second() -> None:
    limiter = RepairLimiter(RepairPolicy(unicast_burst=2.0))  # budget is not the point here
    assert limiter.plan("a", 4, "d1", [0, 1, 2, 3], now=0.0).unicast == [0, 1, 2, 3]
    assert limiter.plan("a", 4, "d1", [0, 1, 2, 3], now=0.5) == RepairPlan([], [])
    assert limiter.plan("a", 4, "d2", [0, 1], now=0.5).unicast == [0, 1]  # per device
    assert limiter.plan("b", 4, "d1", [0, 1], now=0.5).unicast == [0, 1]  # per artifact
    assert limiter.plan("a", 4, "d1", [2, 3], now=1.0).unicast == [2, 3]


def test_a_lone_asker_gets_its_chunks_alone() -> None:
    """One slow device among 300 must not make the other 299 receive its repairs."""
    limiter = RepairLimiter(RepairPolicy())
    limiter.mark_sent("a", range(10), now=0.0)  # the broadcast went out
    assert limiter.plan("a", 10, "slow", [3, 7], now=5.0, audience=300) == RepairPlan([], [3, 7])


def test_a_chunk_most_of_the_rollout_lacks_is_broadcast_once() -> None:
    """Unicast to k askers costs 2k on the wire, a broadcast to N devices 1 + N: the
    asker that makes more than half of the audience turns it into one broadcast."""
    limiter = RepairLimiter(RepairPolicy())
    limiter.mark_sent("a", range(4), now=0.0)
    plans = [limiter.plan("a", 4, f"d{k}", [1], now=2.0, audience=10) for k in range(8)]
    assert [p.unicast for p in plans[:5]] == [[1]] * 5  # 2 * 5 = 10, not > 11
    assert plans[5] == RepairPlan([1], [])  # 2 * 6 = 12 > 11
    assert plans[6] == plans[7] == RepairPlan([], [])  # just broadcast: they get it
    # the count starts again after a broadcast
    assert limiter.plan("a", 4, "d0", [1], now=3.5, audience=10) == RepairPlan([], [1])


def test_askers_older_than_the_window_do_not_count() -> None:
    limiter = RepairLimiter(RepairPolicy(shared_window_s=10.0))
    limiter.mark_sent("a", range(2), now=0.0)
    for k in range(2):
        assert limiter.plan("a", 2, f"d{k}", [0], now=1.0, audience=4).unicast == [0]
    # three askers of four would broadcast; two of them asked 20 s ago
    assert limiter.plan("a", 2, "d2", [0], now=21.0, audience=4).unicast == [0]
    assert limiter.plan("a", 2, "d3", [0], now=21.0, audience=4).unicast == [0]
    assert limiter.plan("a", 2, "d0", [0], now=21.5, audience=4).broadcast == [0]


def test_chunks_the_broadcast_never_got_out_are_broadcast() -> None:
    """The broker died mid-broadcast: every device lacks the rest, so the first
    request for it brings it to all of them."""
    limiter = RepairLimiter(RepairPolicy())
    limiter.begin_broadcast("a", range(6))
    limiter.mark_sent("a", range(3), now=0.0)
    # still under way: the rest is coming, nothing to resend
    assert limiter.plan("a", 6, "d1", [3, 4, 5], now=2.0, audience=50) == RepairPlan([], [])
    limiter.end_broadcast("a")
    assert limiter.plan("a", 6, "d1", [2, 3, 4, 5], now=3.0, audience=50) == RepairPlan(
        [3, 4, 5], [2]
    )
    assert limiter.plan("a", 6, "d2", [3, 4, 5], now=3.1, audience=50) == RepairPlan([], [])


def test_an_unknown_audience_never_broadcasts() -> None:
    """A rollout this replica does not drive (or one that is over): each asker alone."""
    limiter = RepairLimiter(RepairPolicy())
    for k in range(5):
        assert limiter.plan("a", 100, f"d{k}", [0, 1, 2], now=0.0).unicast == [0, 1, 2]


@pytest.mark.parametrize(
    ("askers", "audience", "broadcast"),
    [(1, 0, False), (50, 0, False), (1, 1, False), (2, 2, True), (1, 2, False), (6, 10, True)],
)
def test_shared_enough(askers: int, audience: int, broadcast: bool) -> None:
    assert shared_enough(askers, audience) is broadcast


def test_a_devices_budget_caps_what_it_can_cost() -> None:
    """Two artifacts' worth to one device, then one per 10 s, however it asks."""
    policy = RepairPolicy(unicast_burst=2, unicast_rate=0.1, artifact_burst=50, min_resend_s=0)
    limiter = RepairLimiter(policy)
    sent = sum(
        len(limiter.plan("a", 100, "greedy", range(100), now=float(s)).unicast) for s in range(10)
    )
    assert sent == 2 * 100 + 90  # the burst, then 10 chunks/s for the 9 seconds after
    assert len(limiter.plan("a", 100, "other", range(100), now=9.0).unicast) == 100


def test_the_artifacts_budget_caps_broadcast_and_unicast_repairs_together() -> None:
    limiter = RepairLimiter(RepairPolicy(artifact_burst=2, artifact_rate=0.1, min_resend_s=0))
    sent = 0
    for second in range(10):  # the first never got out (broadcast), then one asker each
        plan = limiter.plan("a", 100, f"d{second}", range(100), float(second), 5)
        sent += len(plan.broadcast) + len(plan.unicast)
    assert sent == 2 * 100 + 90


def test_the_artifacts_budget_caps_unicast_repairs_of_every_device_together() -> None:
    """300 slow devices each asking for their own tail: the control plane still sends
    at most two artifacts' worth, then one per 10 s, whatever each device's budget."""
    limiter = RepairLimiter(RepairPolicy(artifact_burst=2, artifact_rate=0.1, min_resend_s=0))
    limiter.mark_sent("a", range(100), now=0.0)
    sent = sum(
        len(limiter.plan("a", 100, f"d{k}", range(50), now=t, audience=300).unicast)
        for t in (1.0, 11.0)
        for k in range(10)
    )
    assert sent == 2 * 100 + 100  # the burst, then 10 s at 10 chunks/s


def test_one_device_cannot_spend_the_artifacts_budget() -> None:
    """Red team: each device's own budget was as big as the artifact's, so one device's
    login asking for everything every 5 s took every resend, and honest devices that
    lacked a chunk got nothing until they gave up on MQTT. The default policy leaves
    at least half of the artifact's budget to the others, at any time."""
    limiter = RepairLimiter(RepairPolicy())
    limiter.mark_sent("a", range(100), now=-10.0)
    for t in range(0, 60, 5):  # the device's request rate
        greedy = limiter.plan("a", 100, "greedy", range(100), now=float(t), audience=300)
        honest = limiter.plan("a", 100, f"honest-{t}", [t], now=float(t), audience=300)
        assert honest.unicast == [t], (t, len(greedy.unicast))


def test_askers_are_forgotten_with_the_rollout() -> None:
    """A control plane that runs for months keeps no asker sets of finished rollouts."""
    limiter = RepairLimiter(RepairPolicy())
    limiter.mark_sent("a", range(2), now=0.0)
    for k in range(2):
        assert limiter.plan("a", 2, f"d{k}", [0], now=1.0, audience=4).unicast == [0]
    limiter.forget_askers("a")
    assert limiter._askers == {}
    # two more askers alone no longer make three of four
    assert limiter.plan("a", 2, "d2", [0], now=1.5, audience=4).unicast == [0]
    assert limiter.plan("a", 2, "d3", [0], now=1.5, audience=4).unicast == [0]
