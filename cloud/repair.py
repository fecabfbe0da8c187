"""Chunk repair decisions: which resend requests to serve, which chunks to resend, to whom.

A device asks on its own request topic (``artifacts/{a}/requests/{d}``), which
the broker ACL lets only that device write, so the device id is the broker's.
A request is bounded before it is parsed (bytes) and after (indices within the
artifact's chunk count), and spends a token from its device's bucket.

Where a chunk goes follows the cost of each choice in bytes on the wire. Sent
to the asking device alone (``artifacts/{a}/repairs/{d}``), k askers cost 2k
(control plane -> broker -> device, each); broadcast, N subscribed devices cost
1 + N. So a chunk is broadcast when more than half the rollout's devices asked
for it within ``shared_window_s`` (or when the broadcast never got it out),
and otherwise goes to the asker alone: one slow device no longer makes every
other device receive its repairs (300 devices: 5.6x the artifact sent, and a
slower rollout for all). Every resent chunk is paid from the artifact's
budget (what the control plane sends grows with the artifact, never with
artifact x devices), a unicast one from the asking device's budget too (one
device cannot spend the artifact's), and each chunk is resent at most once per
``min_resend_s`` per destination. The rollout controller feeds these
plain values in and acts on the answer.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common import chunking
from common.errors import InvalidInputError
from common.json_object import parse_json_object
from common.names import check_name


@dataclass(frozen=True)
class RepairPolicy:
    # A request lists at most every chunk of the largest signed chunk list (~8 B/index).
    max_request_bytes: int = 256 + 8 * chunking.MAX_SIGNED_CHUNKS
    # Per device, in requests: a burst, then one per 5 s. An honest agent
    # asks once per quiet spell (``chunk_timeout_s``, 3 s by default) and needs one or
    # two; a refused one falls back to HTTP after its repair rounds.
    device_burst: float = 2.0
    device_rate: float = 0.2
    # All repairs of one artifact, in whole artifacts' worth of chunks: a burst of two
    # full resends, then one artifact per 10 s -- the ceiling on what is resent.
    artifact_burst: float = 2.0
    artifact_rate: float = 0.1
    # Repairs to one device alone, per device and artifact, in the same units: a whole
    # artifact (a device that missed the broadcast), then one per 20 s. NOTE: red team:
    # half the artifact's, so one device's login cannot spend all of it (at 2 and 0.1,
    # one greedy device took every resend and honest devices got none).
    unicast_burst: float = 1.0
    unicast_rate: float = 0.05
    min_resend_s: float = 1.0  # a chunk goes out at most once per this, per destination
    shared_window_s: float = 10.0  # askers of one chunk counted over this
    max_tracked_devices: int = 10_000  # device state kept (least recently used dropped)
    queue_size: int = 64  # requests waiting for the repair worker; more are dropped


@dataclass(frozen=True)
class RepairRequest:
    device_id: str  # as the payload says; the controller drops it unless the topic's
    missing: tuple[int, ...]  # sorted, distinct, each < the artifact's chunk count


@dataclass(frozen=True)
class RepairPlan:
    broadcast: list[int]  # on the artifact's chunk topic, to every subscribed device
    unicast: list[int]  # on the asking device's repair topic, to it alone


def parse_request(payload: bytes, count: int, max_bytes: int) -> RepairRequest:
    """Check and parse one request for an artifact of ``count`` chunks.

    Raise InvalidInputError for anything over ``max_bytes`` (before parsing), not
    a JSON object, with a bad device id, or listing an index outside the artifact.
    """
    if len(payload) > max_bytes:
        raise InvalidInputError(f"chunk request of {len(payload)} bytes (limit {max_bytes})")
    doc = parse_json_object(payload, "chunk request")
    device_id = check_name(doc.get("device_id"), "device id")
    missing = doc.get("missing")
    if not isinstance(missing, list) or len(missing) > count:
        raise InvalidInputError(f"'missing' must be a list of at most {count} chunk indices")
    for i in missing:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count:
            raise InvalidInputError(f"chunk index {i!r} outside 0..{count - 1}")
    return RepairRequest(device_id, tuple(sorted(set(missing))))


def refill(tokens: float, elapsed_s: float, rate: float, burst: float) -> float:
    """A token bucket's level after ``elapsed_s`` seconds (never above ``burst``)."""
    return min(burst, tokens + max(0.0, elapsed_s) * rate)


def plan_resend(
    missing: Iterable[int], last_sent: Mapping[int, float], now: float, min_interval_s: float
) -> list[int]:
    """The requested chunks not sent in the last ``min_interval_s`` seconds."""
    return [i for i in missing if now - last_sent.get(i, -math.inf) >= min_interval_s]


class _Bucket:
    """A token bucket; ``now`` is passed in so that tests drive the clock."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def available(self, now: float) -> int:
        """Whole tokens there now (refilled to ``now``)."""
        self.tokens = refill(self.tokens, now - self.stamp, self.rate, self.burst)
        self.stamp = now
        return int(self.tokens)

    def take(self, now: float, wanted: int = 1) -> int:
        """Take up to ``wanted`` whole tokens; return how many were taken."""
        taken = min(wanted, self.available(now))
        self.tokens -= taken
        return taken


def shared_enough(askers: int, audience: int) -> bool:
    """Broadcast rather than send to each asker: 1 + N bytes on the wire beat 2k.

    ``audience`` 0 means the rollout is unknown here (driven by another replica,
    or over): then each asker gets its own.
    """
    return audience > 0 and 2 * askers > audience + 1


class _DeviceArtifact:
    """One device's unicast budget and send times for one artifact."""

    def __init__(self, bucket: _Bucket) -> None:
        self.bucket = bucket
        self.sent: dict[int, float] = {}


class RepairLimiter:
    """The state behind the decisions: buckets, send times and askers, all bounded.

    Device state is kept for at most ``max_tracked_devices`` ids, and per-device
    artifact state for as many (device, artifact) pairs (least recently used
    dropped); artifact state only for artifacts the registry knows (the caller
    checks before asking), at most one time and one asker set per chunk, askers
    being enrolled devices (the topic's id, checked by the broker).
    """

    def __init__(self, policy: RepairPolicy) -> None:
        self.policy = policy
        self._devices: OrderedDict[str, _Bucket] = OrderedDict()
        self._unicast: OrderedDict[tuple[str, str], _DeviceArtifact] = OrderedDict()
        self._artifacts: dict[str, _Bucket] = {}
        self._sent: dict[str, dict[int, float]] = {}  # broadcast times
        self._pending: dict[str, set[int]] = {}  # chunks of a broadcast under way
        self._askers: dict[str, dict[int, dict[str, float]]] = {}

    def admit_device(self, device_id: str, now: float) -> bool:
        """True if this device may ask now (spends one of its tokens)."""
        p = self.policy
        bucket = self._devices.pop(device_id, None) or _Bucket(p.device_rate, p.device_burst, now)
        self._devices[device_id] = bucket  # most recently used at the end
        while len(self._devices) > p.max_tracked_devices:
            self._devices.popitem(last=False)
        return bucket.take(now) == 1

    def plan(
        self,
        digest: str,
        count: int,
        device_id: str,
        missing: Iterable[int],
        now: float,
        audience: int = 0,
    ) -> RepairPlan:
        """What of ``missing`` to resend now, and how, for an artifact of ``count`` chunks
        that ``audience`` devices are downloading (0: unknown here).

        Skipped: chunks a broadcast under way has yet to send, and chunks sent to this
        device (by broadcast or to it alone) within ``min_resend_s``. The rest are cut
        to their budget and count as sent from this moment.
        """
        p = self.policy
        mine = self._device_artifact(device_id, digest, count, now)
        sent = self._sent.setdefault(digest, {})
        pending = self._pending.get(digest, set())
        fresh = [
            i
            for i in plan_resend(missing, sent, now, p.min_resend_s)
            if i not in pending and now - mine.sent.get(i, -math.inf) >= p.min_resend_s
        ]
        askers = self._askers.setdefault(digest, {})
        broadcast: list[int] = []
        unicast: list[int] = []
        for i in fresh:
            if audience > 0 and i not in sent:  # the broadcast never got it out
                broadcast.append(i)
                continue
            who = askers.setdefault(i, {})
            who[device_id] = now
            for other, at in list(who.items()):
                if now - at > p.shared_window_s:
                    del who[other]
            (broadcast if shared_enough(len(who), audience) else unicast).append(i)
        bucket = self._artifacts.get(digest)
        if bucket is None:
            bucket = _Bucket(p.artifact_rate * count, p.artifact_burst * count, now)
            self._artifacts[digest] = bucket
        broadcast = broadcast[: bucket.take(now, len(broadcast))]
        # A device's own repairs are paid from its budget and from the artifact's too:
        # however many devices ask, the control plane never sends more than two
        # artifacts' worth, then one per 10 s (300 slow devices asked for 20x).
        unicast = unicast[: min(mine.bucket.available(now), bucket.available(now))]
        mine.bucket.take(now, len(unicast))
        bucket.take(now, len(unicast))
        self.mark_sent(digest, broadcast, now)
        for i in unicast:
            mine.sent[i] = now
        return RepairPlan(broadcast, unicast)

    def _device_artifact(
        self, device_id: str, digest: str, count: int, now: float
    ) -> _DeviceArtifact:
        p = self.policy
        key = (device_id, digest)
        state = self._unicast.pop(key, None) or _DeviceArtifact(
            _Bucket(p.unicast_rate * count, p.unicast_burst * count, now)
        )
        self._unicast[key] = state  # most recently used at the end
        while len(self._unicast) > p.max_tracked_devices:
            self._unicast.popitem(last=False)
        return state

    def begin_broadcast(self, digest: str, indices: Iterable[int]) -> None:
        """A broadcast is under way: requests for its unsent chunks wait for it."""
        self._pending[digest] = set(indices)

    def end_broadcast(self, digest: str) -> None:
        """Finished or given up: what it did not send is now never-sent."""
        self._pending.pop(digest, None)

    def forget_askers(self, digest: str) -> None:
        """No rollout of this artifact is running here: its askers (up to a device per
        chunk) need not outlive it; send times and the budget stay."""
        self._askers.pop(digest, None)

    def mark_sent(self, digest: str, indices: Iterable[int], now: float) -> None:
        """Broadcast at ``now``: every subscribed device got these, nobody needs to ask."""
        sent = self._sent.setdefault(digest, {})
        pending = self._pending.get(digest)
        askers = self._askers.get(digest, {})
        for i in indices:
            sent[i] = now
            askers.pop(i, None)
            if pending is not None:
                pending.discard(i)
