"""The batching flags of a serving command (``--max-batch``, ``--batch-delay-us``), so
every server that batches takes the same ones (its own flag-to-environment rule, such
as the fallback's ``FOGLINE_FALLBACK_<FLAG>``, applies to them like to any flag)."""

from __future__ import annotations

import argparse

from common.batch_settings import DEFAULT_MAX_BATCH, MAX_BATCH, BatchSettings
from common.errors import InvalidInputError


def add_batching_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help=f"rows merged into one model run; 0: the package's hint (at most "
        f"{DEFAULT_MAX_BATCH}); 1: no batching",
    )
    parser.add_argument(
        "--batch-delay-us",
        type=float,
        default=5000.0,
        help="longest wait for batch-mates; the calibration at load may shorten it",
    )


def batch_settings_from_args(args: argparse.Namespace) -> BatchSettings | None:
    """None (every request alone) for ``--max-batch 1``; InvalidInputError on bad values."""
    if not 0 <= args.max_batch <= MAX_BATCH:
        raise InvalidInputError(f"--max-batch must be 0..{MAX_BATCH}")
    if args.max_batch == 1:
        return None
    return BatchSettings(max_batch=args.max_batch, max_delay_us=args.batch_delay_us)
