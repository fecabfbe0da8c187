"""Chunk repair decisions: which resend requests to serve, and which chunks to resend.

Anyone who may write a request topic (every device, by the broker ACL) can ask,
and the payload's device id is only a claim. So a request is bounded before it
is parsed (bytes) and after (indices within the artifact's chunk count); it
spends a token from its claimed device's bucket, and the chunks it gets are
paid from its artifact's bucket, so inventing device ids buys nothing past the
artifact's budget; and each chunk is resent at most once per ``min_resend_s``
per artifact, however many ask. The rollout controller feeds these plain
values in and acts on the answer.
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
    # Per claimed device id, in requests: a burst, then one per 5 s. An honest agent
    # asks once per quiet spell (``chunk_timeout_s``, 3 s by default) and needs one or
    # two; a refused one falls back to HTTP after its repair rounds.
    device_burst: float = 2.0
    device_rate: float = 0.2
    # Per artifact, all devices together, in whole artifacts' worth of chunks: a burst
    # of two full resends, then one artifact per 10 s -- the ceiling on what invented
    # device ids can cost.
    artifact_burst: float = 2.0
    artifact_rate: float = 0.1
    min_resend_s: float = 1.0  # a chunk goes out at most once per this, per artifact
    max_tracked_devices: int = 10_000  # device buckets kept (least recently used dropped)
    queue_size: int = 64  # requests waiting for the repair worker; more are dropped


@dataclass(frozen=True)
class RepairRequest:
    device_id: str  # as claimed in the payload: a rate-limit key, never an identity
    missing: tuple[int, ...]  # sorted, distinct, each < the artifact's chunk count


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

    def take(self, now: float, wanted: int = 1) -> int:
        """Take up to ``wanted`` whole tokens; return how many were taken."""
        self.tokens = refill(self.tokens, now - self.stamp, self.rate, self.burst)
        self.stamp = now
        taken = min(wanted, int(self.tokens))
        self.tokens -= taken
        return taken


class RepairLimiter:
    """The state behind the decisions: buckets and last send times, all bounded.

    Device buckets are kept for at most ``max_tracked_devices`` ids (least recently
    used dropped); artifact state only for artifacts the registry knows (the caller
    checks before asking), at most one time per chunk.
    """

    def __init__(self, policy: RepairPolicy) -> None:
        self.policy = policy
        self._devices: OrderedDict[str, _Bucket] = OrderedDict()
        self._artifacts: dict[str, _Bucket] = {}
        self._sent: dict[str, dict[int, float]] = {}

    def admit_device(self, device_id: str, now: float) -> bool:
        """True if this claimed device id may ask now (spends one of its tokens)."""
        p = self.policy
        bucket = self._devices.pop(device_id, None) or _Bucket(p.device_rate, p.device_burst, now)
        self._devices[device_id] = bucket  # most recently used at the end
        while len(self._devices) > p.max_tracked_devices:
            self._devices.popitem(last=False)
        return bucket.take(now) == 1

    def plan(self, digest: str, count: int, missing: Iterable[int], now: float) -> list[int]:
        """Which of ``missing`` to resend now, for an artifact of ``count`` chunks.

        Chunks sent within ``min_resend_s`` are skipped; the rest are cut to the
        artifact's budget. The chosen ones count as sent from this moment.
        """
        p = self.policy
        bucket = self._artifacts.get(digest)
        if bucket is None:
            bucket = _Bucket(p.artifact_rate * count, p.artifact_burst * count, now)
            self._artifacts[digest] = bucket
        wanted = plan_resend(missing, self._sent.get(digest, {}), now, p.min_resend_s)
        wanted = wanted[: bucket.take(now, len(wanted))]
        self.mark_sent(digest, wanted, now)
        return wanted

    def mark_sent(self, digest: str, indices: Iterable[int], now: float) -> None:
        sent = self._sent.setdefault(digest, {})
        for i in indices:
            sent[i] = now
