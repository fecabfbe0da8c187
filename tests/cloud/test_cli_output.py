"""Rollout progress: a live coloured line only on a terminal, NO_COLOR honoured, plain
lines (one per change) when stderr is a pipe or a file."""

from __future__ import annotations

import io

import pytest

from cloud.cli_output import RolloutProgress, render, table


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def state(stage: str, outcome: str = "running") -> dict:
    return {"state": outcome, "seconds": 1.5, "devices": {"d1": {"stage": stage}}}


def test_a_pipe_gets_one_plain_line_per_change() -> None:
    out = io.StringIO()
    progress = RolloutProgress(out)
    for s in (state("sent"), state("sent"), state("activated", "succeeded")):
        progress(s)
    progress.done()
    assert out.getvalue() == "running: d1: sent\nsucceeded: d1: activated\n"


@pytest.mark.parametrize(("no_color", "coloured"), [(None, True), ("1", False)])
def test_a_terminal_gets_a_live_line_coloured_unless_no_color(
    monkeypatch: pytest.MonkeyPatch, no_color: str | None, coloured: bool
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    if no_color is not None:
        monkeypatch.setenv("NO_COLOR", no_color)
    out = Terminal()
    progress = RolloutProgress(out)
    progress(state("activated", "succeeded"))
    progress.done()
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    assert ("\x1b[32msucceeded" in text) is coloured
    assert "succeeded" in text and "d1: " in text


def test_formats_render_the_same_document() -> None:
    import json

    import yaml

    doc = {"models": [{"name": "toy", "version": "1"}]}
    as_table = render(doc, "table", lambda d: table([["toy", None]], ["NAME", "NOTE"]))
    assert as_table == "NAME  NOTE\ntoy"
    assert json.loads(render(doc, "json", str)) == doc
    assert yaml.safe_load(render(doc, "yaml", str)) == doc
