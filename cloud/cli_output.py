"""How operator commands print: ``-o table|json|yaml`` for data on stdout, and progress
or colour on stderr only when it is a terminal (``NO_COLOR`` honoured)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any, TextIO

from common.errors import InvalidInputError

FORMATS = ("table", "json", "yaml")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """``-o/--output table|json|yaml`` and ``--json`` (an alias of ``-o json``)."""
    p.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default="table",
        help="output format (yaml needs PyYAML)",
    )
    p.add_argument(
        "--json",
        dest="output",
        action="store_const",
        const="json",
        default="table",
        help="same as -o json",
    )


def render(doc: Any, fmt: str, table: Callable[[Any], str]) -> str:
    """``doc`` as the operator asked: ``table(doc)``, JSON, or YAML."""
    if fmt == "json":
        return json.dumps(doc, indent=2)
    if fmt == "yaml":
        try:
            import yaml
        except ImportError as exc:
            raise InvalidInputError("-o yaml needs PyYAML: pip install pyyaml") from exc
        return str(yaml.safe_dump(doc, sort_keys=False)).rstrip("\n")
    return table(doc)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """Columns padded to their widest cell; None prints as empty."""
    cells = [header, *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def use_colour(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Colour only on a terminal, never with ``NO_COLOR`` set (https://no-color.org)."""
    env = os.environ if environ is None else environ
    return is_terminal(stream) and not env.get("NO_COLOR") and env.get("TERM") != "dumb"


_COLOURS = {"succeeded": "32", "activated": "32", "failed": "31", "halted": "31"}


def colour(text: str, on: bool) -> str:
    """``text`` in its state's ANSI colour when ``on`` (green done, red failed)."""
    code = _COLOURS.get(text)
    return f"\x1b[{code}m{text}\x1b[0m" if on and code else text


class RolloutProgress:
    """``--wait``'s progress on stderr: one rewritten line on a terminal, else one plain
    line per change (so logs and CI output stay readable)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = is_terminal(stream)
        self.colour = use_colour(stream)
        self._last = ""

    def __call__(self, state: dict[str, Any]) -> None:
        devices = sorted(state.get("devices", {}).items())
        plain = ", ".join(f"{d}: {s['stage']}" for d, s in devices)
        if not self.tty:
            if plain != self._last:
                print(f"{state['state']}: {plain}", file=self.stream, flush=True)
            self._last = plain
            return
        stages = ", ".join(f"{d}: {colour(s['stage'], self.colour)}" for d, s in devices)
        line = f"[{state['seconds']:6.1f}s] {colour(state['state'], self.colour)}: {stages}"
        print(f"\r\x1b[2K{line}", end="", file=self.stream, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)
