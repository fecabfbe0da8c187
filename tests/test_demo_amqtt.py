"""``fogline demo --json`` with the embedded amqtt broker, then the demo killed outright.

A module of its own (the helpers are ``tests.test_demo``'s): under pytest-xdist a module
runs on one worker, so this demo run goes on beside the mosquitto one instead of after it.
"""

from __future__ import annotations

import signal

from tests.test_demo import _check_report, _start_demo, _stop, _wait_all_down, model_cache


def test_amqtt_demo_reports_and_a_killed_demo_takes_everything_down(
    tmp_path, tmp_path_factory
) -> None:
    running = _start_demo(tmp_path, "amqtt", model_cache(tmp_path_factory), turn=False)
    try:
        _check_report(running.report, "amqtt")
        assert "hard_example_turn" not in running.report
        running.proc.send_signal(signal.SIGKILL)  # the demo itself killed outright
        assert running.proc.wait(60) == -signal.SIGKILL
        _wait_all_down(running.report, 15)
    finally:
        _stop(running)
