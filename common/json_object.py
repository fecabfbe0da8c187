"""JSON objects from the wire: one parser, one clear error for every caller."""

from __future__ import annotations

import json
from typing import Any

from common.errors import InvalidInputError


def parse_json_object(data: bytes | str, what: str = "body") -> dict[str, Any]:
    """Parse ``data`` as a JSON object; InvalidInputError names ``what`` was wrong."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    return doc
