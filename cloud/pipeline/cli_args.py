"""Argument types and the argument block that the ``fogline model …`` commands share.

``compress``, ``build-engine`` and ``package`` each take a model file, optional
``--data D.npz`` rows and an ``--out``; their numeric flags are checked against
a range when parsed, so a bad value is argparse's one usage line, not a
traceback later.

NOTE: importing this module must stay cheap and torch-free, like ``cli``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

N = TypeVar("N", int, float)

DATA_HELP = "rows for any model: one array per input name, plus optional 'labels' or 'reference'"


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def bounded(kind: Callable[[str], N], low: N, high: N, unit: str = "") -> Callable[[str], N]:
    """An argparse type: ``kind(text)`` within ``[low, high]`` (``unit`` follows the range)."""

    def check(text: str) -> N:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be within [{low:g}, {high:g}]{unit}, got {text}"
            )
        return value

    check.__name__ = kind.__name__  # argparse's "invalid int value: 'x'" names the type
    return check


def add_model_data_out(
    p: argparse.ArgumentParser,
    *,
    model_flag: str = "--model",
    model_help: str,
    data_help: str = DATA_HELP,
    out_help: str,
    out_metavar: str | None = None,
) -> None:
    """The model file to read, the optional rows (``--data D.npz``) and what to write."""
    p.add_argument(model_flag, type=existing_file, required=True, help=model_help)
    p.add_argument("--data", type=existing_file, default=None, metavar="D.npz", help=data_help)
    p.add_argument("--out", type=Path, required=True, metavar=out_metavar, help=out_help)
