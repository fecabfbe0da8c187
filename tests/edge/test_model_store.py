"""A/B slots: staging never touches the active model; a damaged slot falls back."""

from __future__ import annotations

import json

import pytest

from common.errors import ReplayError, StoreError
from common.manifest import artifact_bytes, split_artifact
from common.signing import Signer, TrustStore
from edge.model_store import ModelStore
from tests.model_fixtures import make_package


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate()


def _files(pkg):
    return split_artifact(artifact_bytes(pkg.directory, pkg.manifest), pkg.manifest)


def _store(tmp_path, signer) -> ModelStore:
    return ModelStore(tmp_path / "state", TrustStore([signer.public_key_hex]))


def test_stage_activate_and_switch_slots(tmp_path, signer) -> None:
    store = _store(tmp_path, signer)
    assert store.load_active() is None
    v1 = make_package(tmp_path / "v1", version="1", release=1, signer=signer)
    v2 = make_package(tmp_path / "v2", version="2", release=2, seed=1, signer=signer)
    s1 = store.stage(v1.signed, _files(v1))
    assert store.load_active() is None  # staged is not active
    store.activate(s1)
    s2 = store.stage(v2.signed, _files(v2))
    assert s2.slot != s1.slot
    assert store.load_active().signed.manifest.version == "1"
    store.activate(s2)
    assert store.load_active().signed.manifest.version == "2"
    previous = store.previous()
    assert previous.signed.manifest.version == "1"
    store.activate(previous)
    assert store.load_active().signed.manifest.version == "1"
    assert store.previous().signed.manifest.version == "2"  # and forward again


def test_damaged_active_slot_falls_back_to_previous(tmp_path, signer) -> None:
    store = _store(tmp_path, signer)
    for v in ("1", "2"):
        pkg = make_package(tmp_path / v, version=v, release=int(v), signer=signer)
        store.activate(store.stage(pkg.signed, _files(pkg)))
    active = store.load_active()
    assert active.signed.manifest.version == "2"
    active.model_file.write_bytes(b"half-written")
    assert store.load_active().signed.manifest.version == "1"


def test_older_release_is_refused_unless_downgrade_allowed(tmp_path, signer) -> None:
    store = _store(tmp_path, signer)
    v2 = make_package(tmp_path / "v2", version="2", release=2, signer=signer)
    store.activate(store.stage(v2.signed, _files(v2)))
    v1 = make_package(tmp_path / "v1", version="1", release=1, signer=signer)
    with pytest.raises(ReplayError, match="older"):
        store.check_release(v1.signed)
    store.check_release(v1.signed, allow_downgrade=True)


def test_staging_over_the_previous_slot_clears_it_as_rollback_target(tmp_path, signer) -> None:
    store = _store(tmp_path, signer)
    for v in ("1", "2", "3"):
        pkg = make_package(tmp_path / v, version=v, release=int(v), signer=signer)
        store.activate(store.stage(pkg.signed, _files(pkg)))
    pointer = json.loads((tmp_path / "state" / "active.json").read_text())
    assert pointer["previous"] is not None
    assert store.previous().signed.manifest.version == "2"


def test_not_enough_disk_is_a_clear_error(tmp_path, signer) -> None:
    store = _store(tmp_path, signer)
    with pytest.raises(StoreError, match="not enough disk"):
        store.check_space(1 << 62)


def test_sweep_removes_staging_leftovers(tmp_path, signer) -> None:
    store = _store(tmp_path, signer)
    leftover = store.slots_dir / ".staging-deadbeef"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"partial")
    store.sweep()
    assert not leftover.exists()


def test_disk_full_while_staging_keeps_the_active_model(tmp_path, signer, monkeypatch) -> None:
    """ENOSPC mid-write (the disk is the outside world, so it is faked here)."""
    import errno

    import edge.model_store as model_store

    store = _store(tmp_path, signer)
    v1 = make_package(tmp_path / "v1", version="1", release=1, signer=signer)
    store.activate(store.stage(v1.signed, _files(v1)))
    v2 = make_package(tmp_path / "v2", version="2", release=2, seed=1, signer=signer)
    writes = 0

    def full_disk(path, data):
        nonlocal writes
        writes += 1
        if writes == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        path.write_bytes(data)

    monkeypatch.setattr(model_store, "write_durable", full_disk)
    with pytest.raises(StoreError, match="No space left"):
        store.stage(v2.signed, _files(v2))
    assert not list(store.slots_dir.glob(".staging-*"))  # nothing half-written left behind
    assert store.load_active().signed.manifest.version == "1"


def test_deploy_after_fall_back_keeps_the_served_model_when_it_fails(tmp_path, signer) -> None:
    """Issue 8: fall back to the previous slot, deploy, fail the self-test, restart.

    The deploy used to stage into the slot being served (the pointer still named
    the damaged slot as active) and clear it as the rollback target, so the
    restart served nothing. Now it stages into the damaged slot and the served
    model survives.
    """
    store = _store(tmp_path, signer)
    for v in ("1", "2"):
        pkg = make_package(tmp_path / v, version=v, release=int(v), signer=signer)
        store.activate(store.stage(pkg.signed, _files(pkg)))
    store.load_active().model_file.write_bytes(b"half-written")  # v2's slot is damaged
    served = store.load_active()
    assert served.signed.manifest.version == "1"  # fell back
    v3 = make_package(tmp_path / "3", version="3", release=3, seed=2, signer=signer)
    staged = store.stage(v3.signed, _files(v3))
    assert staged.slot != served.slot  # never the slot being served
    # The self-test fails: activate is never called. A restart must still serve v1.
    restarted = _store(tmp_path, signer)
    assert restarted.load_active().signed.manifest.version == "1"
    # And a deploy that passes makes v1 the rollback target.
    restarted.activate(staged)
    assert restarted.load_active().signed.manifest.version == "3"
    assert restarted.previous().signed.manifest.version == "1"
