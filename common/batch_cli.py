"""The batching flags of a serving command (``--max-batch``, ``--batch-delay-us``), with
``<PREFIX>_MAX_BATCH`` / ``<PREFIX>_BATCH_DELAY_US`` environment defaults, so every
server that batches takes the same flags."""

from __future__ import annotations

import argparse
import os

from common.batch_settings import DEFAULT_MAX_BATCH, MAX_BATCH, BatchSettings
from common.errors import InvalidInputError


def add_batching_flags(parser: argparse.ArgumentParser, env_prefix: str) -> None:
    # A string default from the environment goes through ``type`` like a typed value.
    parser.add_argument(
        "--max-batch",
        type=int,
        default=os.environ.get(f"{env_prefix}_MAX_BATCH", 0),
        help=f"rows merged into one model run; 0: the package's hint (at most "
        f"{DEFAULT_MAX_BATCH}); 1: no batching (default %(default)s, ${env_prefix}_MAX_BATCH)",
    )
    parser.add_argument(
        "--batch-delay-us",
        type=float,
        default=os.environ.get(f"{env_prefix}_BATCH_DELAY_US", 5000.0),
        help="longest wait for batch-mates; the calibration at load may shorten it "
        f"(default %(default)s, ${env_prefix}_BATCH_DELAY_US)",
    )


def batch_settings_from_args(args: argparse.Namespace) -> BatchSettings | None:
    """None (every request alone) for ``--max-batch 1``; InvalidInputError on bad values."""
    if not 0 <= args.max_batch <= MAX_BATCH:
        raise InvalidInputError(f"--max-batch must be 0..{MAX_BATCH}")
    if args.max_batch == 1:
        return None
    return BatchSettings(max_batch=args.max_batch, max_delay_us=args.batch_delay_us)
