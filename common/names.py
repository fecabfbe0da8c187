"""Names from outside, checked once at the door.

A model name, version, variant, device id, key id or file name that will become
a path component, an MQTT topic level or a database key passes one of these
checks before anything else sees it. Code past the door may assume it holds a
single safe component: ASCII letters, digits, ``.``, ``_`` and ``-``, starting
with a letter or digit (so never ``.``, ``..``, empty, absolute, or containing
``/``, ``%``, NUL, whitespace, MQTT wildcards or look-alike unicode), and
bounded in length.

An artifact id is stricter: a lowercase hex SHA-256 digest.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.errors import InvalidInputError

MAX_NAME_LENGTH = 64
# NOTE: fullmatch, never match with "$": "$" also matches before a trailing newline.
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def check_name(value: object, what: str = "name") -> str:
    """``value`` if it is a safe single path component / topic level, else InvalidInputError."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise InvalidInputError(
            f"invalid {what} {shown!r}: use 1-{MAX_NAME_LENGTH} of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value


def check_digest(value: object, what: str = "artifact id") -> str:
    """``value`` if it is a lowercase hex SHA-256 digest, else InvalidInputError."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise InvalidInputError(f"invalid {what} {shown!r}: must be 64 lowercase hex digits")
    return value


def safe_join(root: Path, *parts: str) -> Path:
    """``root / parts...`` built from checked parts, resolved and checked to stay under root.

    The second check is belt and braces: a symlink planted under ``root`` must not
    lead a write elsewhere either.
    """
    path = root.joinpath(*(check_name(p, "path component") for p in parts))
    resolved_root = root.resolve()
    resolved = path.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise InvalidInputError(f"path {path} leaves {root}")
    return path
