"""The one door for names from outside: every trick an attacker tries is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import topics
from common.errors import InvalidInputError
from common.names import check_digest, check_name, safe_join

HOSTILE = [
    "",
    ".",
    "..",
    "../x",
    "../../keys/signing.pem",
    "/etc/passwd",
    "a/b",
    "a%2Fb",
    "a\\b",
    "a\x00b",
    "x\n",
    " x",
    "#",
    "+",
    "a b",
    "x" * 65,
    "ａｂｃ",  # fullwidth letters
    "e\u0301",  # combining accent
    "․․",  # one-dot leaders, looks like ".."
    ".hidden",
    "-rf",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_names_are_refused(value: str) -> None:
    with pytest.raises(InvalidInputError):
        check_name(value, "device id")


@pytest.mark.parametrize("value", ["digits", "edge-1", "v1.2.3", "a_b", "x" * 64, "0"])
def test_ordinary_names_pass(value: str) -> None:
    assert check_name(value) == value


def test_non_strings_are_refused() -> None:
    for value in (None, 7, ["a"], b"a"):
        with pytest.raises(InvalidInputError):
            check_name(value)


def test_digests_are_lowercase_hex_only() -> None:
    good = "ab" * 32
    assert check_digest(good) == good
    for bad in ("AB" * 32, good[:-1], good + "0", "./" * 32, good[:-1] + "\n", None):
        with pytest.raises(InvalidInputError):
            check_digest(bad)


def test_safe_join_stays_under_its_root(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a", "b") == tmp_path / "a" / "b"
    with pytest.raises(InvalidInputError):
        safe_join(tmp_path, "..", "x")
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)  # planted symlink: must not lead a write out
    with pytest.raises(InvalidInputError):
        safe_join(root, "link", "x")


@pytest.mark.parametrize("value", HOSTILE)
def test_topics_refuse_hostile_device_ids(value: str) -> None:
    with pytest.raises(ValueError):
        topics.device_topic(value, "commands")
