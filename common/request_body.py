"""Request bodies under limits: size per route, a deadline, and a shared byte budget.

A body is read in full, against its deadline, *before* its request takes an
inference slot: a client that sends headers and then holds the body open gets
408 and never holds a slot (64 such connections once took every slot, and
every valid request got 503). The byte budget bounds the request bytes being
read, decoded and served at once, so memory stays bounded however many large
requests arrive together; past it, requests are shed with 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import web

from common.errors import OverloadedError, PayloadTooLargeError, RequestTimeoutError
from common.tensor_json import JsonLimits

DEFAULT_MAX_BODY = 64 << 20  # aiohttp's 1 MiB default is too small for batched tensors
DEFAULT_SMALL_BODY = 64 << 10  # routes that are not infer take no real body


@dataclass(frozen=True)
class RequestLimits:
    """Every bound on one V2 server's requests (STYLE: "Bounded everything")."""

    max_body: int = DEFAULT_MAX_BODY  # infer routes
    max_small_body: int = DEFAULT_SMALL_BODY  # every other route
    body_timeout_s: float = 30.0  # the whole body must arrive within this
    decode_budget: int = 2 * DEFAULT_MAX_BODY  # request bytes held at once, all requests
    json: JsonLimits = field(default_factory=JsonLimits)

    def __post_init__(self) -> None:
        if self.max_body < 1 or self.max_small_body < 1 or self.body_timeout_s <= 0:
            raise ValueError("body limits and timeout must be positive")
        if self.decode_budget < self.max_body:
            raise ValueError("decode_budget must hold at least one largest body")


class ByteBudget:
    """Request bytes held now across all requests, against ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.shed = 0

    @contextmanager
    def hold(self) -> Iterator[Hold]:
        """A hold that gives back everything it took when the block ends."""
        hold = Hold(self)
        try:
            yield hold
        finally:
            self.used -= hold.taken


class Hold:
    """One request's share of a ``ByteBudget``."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.taken = 0

    def take(self, n: int) -> None:
        budget = self.budget
        if budget.used + n > budget.limit:
            budget.shed += 1
            raise OverloadedError(
                f"server is holding {budget.used} bytes of requests, its limit is {budget.limit}"
            )
        budget.used += n
        self.taken += n


async def read_body(request: web.Request, *, limit: int, timeout_s: float, hold: Hold) -> bytes:
    """The whole body, within ``limit`` bytes and ``timeout_s``; every byte taken from ``hold``.

    Bytes are taken as they arrive (not as declared), so a client that declares
    a large body and sends nothing holds nothing.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes is over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"body is over the limit of {limit} bytes")
                hold.take(len(chunk))
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(f"the body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)
