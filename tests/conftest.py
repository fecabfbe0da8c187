"""Shared fixtures: a real Mosquitto broker on a free port for the test session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# NOTE: the suite runs on a shared 2-core machine: example generation may be slow there
# (the health check's "too slow" is about the machine, not the code), and a per-example
# deadline would turn a busy moment into a failure. What is checked stays the same.
settings.register_profile("fogline", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fogline")


def _worker_environment() -> None:
    """Under pytest-xdist, each worker gets its own slice of the ports ``free_port`` picks
    from, and one OpenMP thread.

    ``FOGLINE_PORT_RANGE`` is inherited by every process a test starts (a demo, an agent),
    so no two workers ever pick the same port, whoever picks it. ``OMP_NUM_THREADS=1``:
    four workers on two cores, each training with a thread per core, spend their time
    spinning in OpenMP barriers. Idempotent: this module may be imported twice (as
    conftest and as ``tests.conftest``).
    """
    from fogline.broker import _LOWEST_PORT, PORT_RANGE_ENV, _ephemeral_range

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2:
        return
    low, high = _LOWEST_PORT, _ephemeral_range()[0] - 1  # the default range, sliced
    size = (high - low + 1) // count
    start = low + int(worker.removeprefix("gw")) * size
    os.environ[PORT_RANGE_ENV] = f"{start}-{start + size - 1}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")


_worker_environment()


def free_port() -> int:
    """The demo's pick: below the ephemeral range, so no client connect() takes it first."""
    from fogline.broker import free_port as pick

    return pick()


def wait_port(
    host: str, port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Until something listens on ``host:port``; fails at once if ``proc`` (the listener
    we started) exits first. Generous: a busy machine (parallel workers) starts slowly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


class Mosquitto:
    """A mosquitto process we own; ``stop``/``start`` let fault tests cut the broker."""

    def __init__(self, workdir: Path) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.host, self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto binary not on PATH")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of this test's own: no retained status of other tests' devices on it,
    for tests that count the whole fleet."""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto binary not on PATH")
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the local server (trust auth), dropped after."""
    psycopg = pytest.importorskip("psycopg")
    import uuid

    try:
        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {exc}")
    name = f"fogline_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# The modules that take longest (whole demo runs, agent and server processes, training).
# Under pytest-xdist (scripts/test.sh: --dist loadscope --no-loadscope-reorder) a module
# goes to one worker as a whole, in collection order: these start first, so that no worker
# is left with one of them at the end while the others idle. Order within a module is kept.
LONG_MODULES = (  # from `pytest --durations`, longest first
    "tests/test_demo.py",
    "tests/test_demo_amqtt.py",
    "tests/cloud/test_training_scale.py",
    "tests/cloud/test_pipeline.py",
    "tests/test_v2_fuzz.py",
    "tests/edge/test_load_escalation.py",
    "tests/cloud/test_prune.py",
    "tests/test_request_memory.py",
    "tests/cloud/test_control_cli.py",
    "tests/test_operator_cli.py",
    "tests/edge/test_agent_crash.py",
    "tests/cloud/test_distill.py",
    "tests/edge/test_multimodel.py",
    "tests/test_fleet_simulator.py",
    "tests/edge/test_systemd_notify.py",
    "tests/cloud/test_lineage_cli.py",
    "tests/test_broker_auth.py",
    "tests/edge/test_agent_rollout.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {module: i for i, module in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))
