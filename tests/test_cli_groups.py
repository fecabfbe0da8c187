"""``fogline GROUP ...`` builds only the group it names: an agent's start, or any one
command, no longer imports every other group's modules (about a second of CPU each)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fogline.cli import GROUPS, named_group
from tests.fogline_cli import ROOT, fogline

PROBE = """
import sys
from fogline.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted(m for m in sys.modules if m.startswith(("cloud.", "edge.", "fogline.")))))
"""


def _imported(*argv: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_an_edge_command_imports_no_cloud_module() -> None:
    modules = _imported("edge", "run", "--help")
    assert "edge.cli" in modules
    assert not {m for m in modules if m.startswith("cloud.")}, modules
    assert "fogline.demo" not in modules


def test_version_imports_no_group() -> None:
    modules = _imported("--version")
    assert not {m for m in modules if m.startswith(("cloud.", "edge."))}, modules


@pytest.mark.parametrize(
    ("argv", "group"),
    [
        (["control", "devices"], "control"),
        (["--log-level", "DEBUG", "edge", "run"], "edge"),
        (["--trace", "fallback", "serve"], "fallback"),
        (["--log-level", "control"], None),  # "control" is the level here, not a group
        (["--log", "DEBUG", "control", "devices"], "control"),  # argparse's abbreviation
        (["--log-level=DEBUG", "edge"], "edge"),
        (["--", "edge"], "edge"),  # past "--" it is the group all the same
        (["--help"], None),
        (["nonsense", "control"], None),
    ],
)
def test_the_named_group_is_found_past_the_global_options(argv, group) -> None:
    assert named_group(argv) == group


def test_an_abbreviated_global_option_still_reaches_the_command() -> None:
    shown = fogline("--log", "WARNING", "control", "devices", "--help")
    assert shown.returncode == 0 and "--control" in shown.stdout, shown.stderr


def test_every_group_still_shows_in_help_and_runs_its_own_help() -> None:
    top = fogline("--help")
    assert top.returncode == 0
    for name in GROUPS:
        assert f"    {name} " in top.stdout, name
    assert fogline("rollout", "--help").returncode == 0
    bad = fogline("nonsense")
    assert bad.returncode == 2 and "invalid choice: 'nonsense'" in bad.stderr
