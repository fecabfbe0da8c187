"""What dynamic batching is configured with, and the request deadline it honours.

Kept apart from the batcher so the V2 layer and the CLIs can check them
without the batching machinery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import InvalidInputError
from common.inference import InferRequest

DEADLINE_PARAM = "fogline.deadline_ms"  # request parameter; the HTTP header lands here
DEADLINE_HEADER = "fogline-deadline-ms"
MAX_DEADLINE_MS = 3_600_000.0  # one hour: past it a "deadline" is a mistake, not a bound
MAX_BATCH = 1024
DEFAULT_MAX_BATCH = 64  # when the package's hint allows more


@dataclass(frozen=True)
class BatchSettings:
    """``max_batch``: rows per execution (0: the caller picks, e.g. from the package's
    hints); ``max_delay_us``: longest wait for batch-mates.

    ``calibrate``: measure at load the batch size past which throughput stops
    rising (``preferred``) and wait at most one such batch's compute time.
    """

    max_batch: int = 32
    max_delay_us: float = 5000.0
    calibrate: bool = True
    calibration_s: float = 1.5

    def __post_init__(self) -> None:
        if not 0 <= self.max_batch <= MAX_BATCH:
            raise InvalidInputError(f"max batch must be 0..{MAX_BATCH}, got {self.max_batch}")
        if not (math.isfinite(self.max_delay_us) and 0 <= self.max_delay_us <= 1e6):
            raise InvalidInputError(f"queue delay must be 0..1e6 us, got {self.max_delay_us}")


def deadline_ms(request: InferRequest) -> float | None:
    """The request's deadline in milliseconds (``fogline.deadline_ms``), or None.

    Accepts a JSON number or a numeric string (the header's form); anything
    else, NaN, infinities, zero, negatives and more than an hour are a 400.
    """
    raw = request.parameters.get(DEADLINE_PARAM)
    if raw is None:
        return None
    value: float | None = None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str) and len(raw) <= 32:
        try:
            value = float(raw)
        except ValueError:
            value = None
    if value is None or not math.isfinite(value) or not 0 < value <= MAX_DEADLINE_MS:
        raise InvalidInputError(
            f"{DEADLINE_PARAM} must be a number of milliseconds in (0, {MAX_DEADLINE_MS:.0f}]"
        )
    return value
