"""One way for every ``fogline`` subcommand to report bad input: one line, exit 1."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from common.errors import FoglineError

Handler = Callable[[argparse.Namespace], int]


def one_line_errors(handler: Handler) -> Handler:
    """Turn Fogline and file errors into ``error: ...`` on stderr and exit code 1.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except BrokenPipeError:
            raise  # stdout closed (`| head`): fogline.cli.main ends quietly
        except (FoglineError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run
