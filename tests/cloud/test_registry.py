"""Registry: closing while worker threads still query must not crash the process."""

from __future__ import annotations

import threading

import pytest

from cloud.registry import Registry
from common.errors import StoreError


def test_close_waits_for_queries_in_flight_and_later_ones_fail_cleanly(tmp_path) -> None:
    registry = Registry(tmp_path / "r.sqlite", tmp_path / "store")
    errors: list[BaseException] = []
    started = threading.Event()

    def hammer() -> None:
        started.set()
        try:
            for i in range(100_000):
                registry.upsert_device(f"d{i % 50}", {"state": "online"})
        except StoreError:
            return  # closed under us: a clean error, not a crash
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for w in workers:
        w.start()
    started.wait()
    registry.close()
    for w in workers:
        w.join(30)
    assert not errors
    with pytest.raises(StoreError, match="closed"):
        registry.devices()
