"""A circuit breaker for calls to the cloud: stop hammering a cloud that is down."""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


class CircuitBreaker:
    """closed → open after N consecutive failures → half-open after a cooldown.

    Half-open lets one trial call through: success closes, failure reopens.
    """

    def __init__(
        self, *, failures: int, cooldown_s: float, clock: Callable[[], float], name: str = "cloud"
    ) -> None:
        self.name = name
        self.limit = failures
        self.cooldown_s = cooldown_s
        self.state = "closed"
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False

    def allow(self) -> bool:
        if self.state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            self._set("half_open")
        if self.state == "closed":
            return True
        if self.state == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._trial = False
        if self.state != "closed":
            self._set("closed")

    def failure(self) -> None:
        self._failures += 1
        self._trial = False
        if self.state == "half_open" or (self.state == "closed" and self._failures >= self.limit):
            self._opened_at = self._clock()
            self._set("open")

    def release(self) -> None:
        """A call ended with no verdict on the cloud (it was cancelled)."""
        self._trial = False

    def _set(self, state: str) -> None:
        logger.info("circuit %s: %s -> %s", self.name, self.state, state)
        self.state = state
