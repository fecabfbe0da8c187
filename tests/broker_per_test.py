"""``from tests.broker_per_test import mosquitto_per_test`` in a test module gives each of
its tests a broker of its own under the usual ``mosquitto`` name.

For modules whose tests count the fleet or wait for "the" answer of a device: a
worker's shared broker keeps what earlier tests left on it, the retained "online"
status of their devices (a rollout to every online device waited for one that was
gone) and the persistent sessions of devices of the same id (a command queued
there, signed by another test's key, was refused first).
"""

from __future__ import annotations

import pytest

from tests.conftest import Mosquitto


@pytest.fixture(name="mosquitto")
def mosquitto_per_test(private_mosquitto: Mosquitto) -> Mosquitto:
    return private_mosquitto
