"""What escalation on load decides from: the local queue, and how fast the cloud answers.

Expected local wait = requests running locally x the recent local service time (a
moving average). The cloud's latency is its moving average, or, while a call is
running longer than that, the running call's age: a cloud that just became slow is
noticed before its first slow answer comes back. When the cloud's latency is unknown
or older than ``probe_s``, one request goes to measure it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable


class LoadGauge:
    def __init__(self, clock: Callable[[], float] = time.monotonic, alpha: float = 0.2) -> None:
        self._clock = clock
        self._alpha = alpha  # weight of the newest sample in each moving average
        self.local_inflight = 0
        self.local_ms: float | None = None
        self.cloud_ms: float | None = None
        self._cloud_sampled_at = -float("inf")
        self._cloud_calls: dict[int, float] = {}  # running cloud calls: id -> perf_counter
        self._ids = itertools.count()

    def _average(self, old: float | None, ms: float) -> float:
        return ms if old is None else self._alpha * ms + (1 - self._alpha) * old

    # -- samples -------------------------------------------------------------------------

    def local_started(self) -> float:
        self.local_inflight += 1
        return time.perf_counter()

    def local_ended(self, started: float, *, ok: bool = True) -> float:
        """The call's milliseconds; only a call that answered updates the average."""
        self.local_inflight -= 1
        ms = (time.perf_counter() - started) * 1000
        if ok:
            self.local_ms = self._average(self.local_ms, ms)
        return ms

    def new_local_model(self) -> None:
        self.local_ms = None  # a new model has its own speed

    def cloud_started(self) -> int:
        call = next(self._ids)
        self._cloud_calls[call] = time.perf_counter()
        return call

    def cloud_ended(self, call: int, *, ok: bool) -> float:
        """The call's milliseconds; only an answer updates the cloud's latency."""
        ms = (time.perf_counter() - self._cloud_calls.pop(call)) * 1000
        if ok:
            self.cloud_ms = self._average(self.cloud_ms, ms)
            self._cloud_sampled_at = self._clock()
        return ms

    # -- decisions -----------------------------------------------------------------------

    def expected_wait_ms(self) -> float | None:
        local = self.local_ms
        return None if local is None else self.local_inflight * local

    def cloud_latency_ms(self) -> float | None:
        now = time.perf_counter()
        running = (now - min(self._cloud_calls.values(), default=now)) * 1000
        if self.cloud_ms is None:
            return running if self._cloud_calls else None
        return max(self.cloud_ms, running)

    def offload(self, budget_ms: float, probe_s: float) -> bool:
        """Whether a new request should go to the cloud (reason ``load``): the local wait
        is past ``budget_ms`` and the cloud answers before the local queue would."""
        wait = self.expected_wait_ms()
        if wait is None or wait <= budget_ms:
            return False
        now = self._clock()
        cloud = self.cloud_latency_ms()
        if cloud is None or now - self._cloud_sampled_at > probe_s:
            self._cloud_sampled_at = now  # NOTE: one probe per interval, not a burst
            return True
        return cloud < wait + (self.local_ms or 0.0)
