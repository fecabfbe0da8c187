"""``fogline keys`` and ``fogline model sign`` on a real workdir: files, modes, keyrings."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from cloud.keys import KeyStore, enrollment_trust, trusted_public_keys
from common.keyring import apply_chain
from common.manifest import MANIFEST_FILE, artifact_bytes, read_package, write_unsigned
from common.signing import Signer, TrustStore
from fogline.cli import main
from tests.model_fixtures import make_package


def fogline(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def keys_json(capsys, workdir: Path) -> dict[str, dict[str, str]]:
    rc, out, err = fogline(capsys, "keys", "list", "--workdir", str(workdir), "--json")
    assert rc == 0, err
    return {k["key_id"]: k for k in json.loads(out)}


def test_create_rotate_retire_revoke_on_a_workdir(capsys, tmp_path) -> None:
    work = tmp_path / "control"
    rc, out, _ = fogline(capsys, "keys", "create", "--workdir", str(work))
    assert rc == 0 and "control key" in out
    store = KeyStore(work)
    first = store.signer()
    # Outside the served store/, a private directory, private files.
    assert store.dir == work / "keys" and mode(store.dir) == 0o700
    assert mode(store.signing_path) == 0o600 and mode(store.keyring_path) == 0o600
    assert keys_json(capsys, work)[first.key_id]["state"] == "active"
    rc, _, err = fogline(capsys, "keys", "create", "--workdir", str(work))
    assert rc == 2 and "exists" in err and "Traceback" not in err
    # A lost key is not silently replaced: the fleet would refuse a keyring restarted at 1.
    store.signing_path.rename(tmp_path / "backup.pem")
    rc, _, err = fogline(capsys, "keys", "create", "--workdir", str(work))
    assert rc == 2 and "restore the key" in err
    (tmp_path / "backup.pem").rename(store.signing_path)

    rc, out, _ = fogline(capsys, "keys", "rotate", "--workdir", str(work), "--json")
    second = store.signer()
    assert rc == 0 and json.loads(out) == {
        "key_id": second.key_id,
        "previous": first.key_id,
        "sent": 0,
    }
    assert second.key_id != first.key_id and mode(store.signing_path) == 0o600
    assert first.to_pem() not in store.signing_path.read_bytes()  # one private key on disk
    assert [k["state"] for k in keys_json(capsys, work).values()] == ["active", "trusted"]
    # The keyring that adds the new key is signed by the old one: devices can follow.
    history = store.history()
    assert history[1]["key_id"] == first.key_id
    anchored = TrustStore([first.public_key_hex])
    trust, _ = apply_chain(anchored, history)
    assert {k.key_id for k in trust.keys} == {first.key_id, second.key_id}

    rc, _, err = fogline(capsys, "keys", "retire", second.key_id, "--workdir", str(work))
    assert rc == 2 and "active signing key" in err
    assert fogline(capsys, "keys", "retire", first.key_id, "--workdir", str(work))[0] == 0
    assert keys_json(capsys, work)[first.key_id]["state"] == "retired"
    assert fogline(capsys, "keys", "revoke", first.key_id, "--workdir", str(work))[0] == 0
    assert keys_json(capsys, work)[first.key_id]["state"] == "revoked"
    rc, _, err = fogline(capsys, "keys", "revoke", first.key_id, "--workdir", str(work))
    assert rc == 2 and "already revoked" in err
    trust, applied = apply_chain(anchored, store.history())
    assert trust.version == 4 and first.key_id in trust.revoked and len(applied) == 4
    # What enrollment writes into an agent config (the broker branch's `fogline device enroll`).
    assert trusted_public_keys(work) == [second.public_key_hex]
    enrolled = enrollment_trust(work)
    fresh, _ = apply_chain(
        TrustStore(enrolled["trusted_keys"]), [enrolled["trusted_keyring"]], require_newer=False
    )
    assert fresh.version == 4 and first.key_id in fresh.revoked


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "list", "--workdir", "{w}/none"], "no keyring"),
        (["keys", "rotate", "--workdir", "{w}/none"], "no signing key"),
        (["keys", "retire", "0123456789abcdef", "--workdir", "{w}/c"], "no key"),
        (["keys", "revoke", "../../etc", "--workdir", "{w}/c"], "invalid key id"),
        (["keys", "add", "nothex", "--workdir", "{w}/c"], "public key"),
        (["keys", "add", "ab" * 31, "--workdir", "{w}/c"], "public key"),
        (["keys", "rotate"], "--workdir"),
        (["keys", "create"], "--workdir"),
        (["keys", "create", "--release"], "--out"),
        (["keys", "create", "--release", "--out", "{w}/c/keys/signing.pem"], "exists"),
        (["model", "sign", "--package", "{w}/nopkg", "--key", "{w}/rel.pem"], "manifest"),
        (["model", "sign", "--package", "{w}/nopkg", "--key", "{w}/none.pem"], "cannot read"),
        (["model", "sign", "--package", "{w}/nopkg", "--key", "{w}/c/keys/keyring.json"], "PEM"),
    ],
)
def test_bad_input_is_a_clear_error_not_a_traceback(capsys, tmp_path, argv, message) -> None:
    KeyStore(tmp_path / "c").create()
    (tmp_path / "rel.pem").write_bytes(Signer.generate().to_pem())
    rc, _, err = fogline(capsys, *(a.format(w=tmp_path) for a in argv))
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_offline_changes_wait_for_a_running_control_plane(capsys, tmp_path) -> None:
    store = KeyStore(tmp_path)
    store.create()
    with store.locked():  # what a running control plane holds
        rc, _, err = fogline(capsys, "keys", "rotate", "--workdir", str(tmp_path))
        assert rc == 2 and "running control plane" in err
        assert fogline(capsys, "keys", "list", "--workdir", str(tmp_path))[0] == 0  # reads ok
    assert fogline(capsys, "keys", "rotate", "--workdir", str(tmp_path))[0] == 0


def test_release_key_and_offline_signing(capsys, tmp_path) -> None:
    key = tmp_path / "release.pem"
    rc, out, _ = fogline(capsys, "keys", "create", "--release", "--out", str(key))
    release = Signer.from_pem(key.read_bytes())
    assert rc == 0 and release.public_key_hex in out and mode(key) == 0o600

    work = tmp_path / "control"
    KeyStore(work).create()
    rc, _, _ = fogline(capsys, "keys", "add", release.public_key_hex, "--workdir", str(work))
    assert rc == 0 and keys_json(capsys, work)[release.key_id]["role"] == "release"
    rc, _, err = fogline(capsys, "keys", "add", release.public_key_hex, "--workdir", str(work))
    assert rc == 2 and "already" in err

    pkg = make_package(tmp_path / "pkg")
    (pkg.directory / MANIFEST_FILE).unlink()
    write_unsigned(pkg.directory, pkg.manifest)
    rc, out, _ = fogline(
        capsys, "model", "sign", "--package", str(pkg.directory), "--key", str(key)
    )
    assert rc == 0 and release.key_id in out
    trust = KeyStore(work).trust()
    signed = read_package(pkg.directory, trust, purpose="release")
    assert signed.key_id == release.key_id
    assert replace(signed.manifest, chunks=None) == pkg.manifest
    signed.manifest.check_chunks(artifact_bytes(pkg.directory, pkg.manifest))  # chunks signed

    (pkg.directory / MANIFEST_FILE).unlink()
    (pkg.directory / "model.onnx").write_bytes(b"not the model the manifest names")
    rc, _, err = fogline(
        capsys, "model", "sign", "--package", str(pkg.directory), "--key", str(key)
    )
    assert rc == 2 and "SHA-256" in err
    assert not (pkg.directory / MANIFEST_FILE).exists()  # nothing signed that does not match
