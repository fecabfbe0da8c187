"""JSON from the wire: one parser, one clear error for every caller.

Bounded (STYLE: "Bounded everything"): nesting deeper than ``max_depth`` is a
400, never a ``RecursionError``; ``NaN``, ``Infinity`` and numbers too large
for a float (``1e999``) are refused, since JSON has no such values and they
would otherwise come back out as bare ``NaN`` that no strict parser reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from common.errors import InvalidInputError

MAX_DEPTH = 32  # V2 bodies need 4 levels plus the tensor's own nesting


class _NonFiniteError(Exception):
    """Raised inside json.loads for NaN/Infinity; not a ValueError, so it is told apart."""


def _refuse_constant(name: str) -> Any:
    raise _NonFiniteError(name)


def load_json(
    data: bytes | str,
    what: str = "body",
    *,
    max_depth: int = MAX_DEPTH,
    object_hook: Callable[[dict[str, Any]], Any] | None = None,
) -> Any:
    """Parse ``data`` as strict JSON within ``max_depth``; InvalidInputError names ``what``."""
    try:
        doc = json.loads(data, parse_constant=_refuse_constant, object_hook=object_hook)
    except _NonFiniteError as exc:
        raise InvalidInputError(
            f"{what} holds {exc.args[0]}, which is not JSON: send finite numbers"
        ) from None
    except RecursionError:
        raise InvalidInputError(f"{what} is nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {exc}") from None
    check_tree(doc, max_depth, what)
    return doc


def parse_json_object(
    data: bytes | str,
    what: str = "body",
    *,
    max_depth: int = MAX_DEPTH,
    object_hook: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Parse ``data`` as a JSON object; InvalidInputError names ``what`` was wrong."""
    doc = load_json(data, what, max_depth=max_depth, object_hook=object_hook)
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    return doc


def check_tree(doc: Any, max_depth: int, what: str = "body") -> None:
    """Refuse nesting past ``max_depth`` and infinite floats, without recursion."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            raise InvalidInputError(f"{what} is nested deeper than {max_depth} levels")
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
            elif isinstance(child, float) and not math.isfinite(child):
                raise InvalidInputError(f"{what} holds a number too large for a float")


def dumps_strict(doc: Any) -> bytes:
    """JSON bytes, or ValueError if ``doc`` holds NaN or infinity (never bare ``NaN``)."""
    return json.dumps(doc, allow_nan=False).encode()
