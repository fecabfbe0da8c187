"""``fogline device enroll|list|revoke`` and ``fogline broker config``, through the real CLI."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cloud.enrollment import load_enrollments
from common import broker_auth
from common.device_token import verify_token
from common.signing import Signer, TrustStore
from edge.config import AgentConfig
from fogline.cli import main
from tests.tls_certs import make_pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _enroll(workdir: Path, device_id: str, out: Path, *extra: str) -> int:
    return main(
        ["device", "enroll", device_id, "--workdir", str(workdir), "--out", str(out), *extra]
    )


def test_enroll_writes_a_working_agent_config(tmp_path: Path) -> None:
    workdir, out = tmp_path / "control", tmp_path / "device-1.json"
    extra = ["--label", "site=berlin", "--fallback-url", "http://fallback:9000"]
    ca = make_pki(tmp_path / "pki").ca
    extra += ["--broker-host", "broker.example", "--broker-port", "8883"]
    extra += ["--broker-tls-ca", str(ca)]
    assert _enroll(workdir, "device-1", out, *extra) == 0
    assert _mode(out) == 0o600
    config = AgentConfig.from_file(out)
    signer = Signer.load_or_create(workdir / "keys" / "signing.pem")
    assert config.device_id == config.broker_username == "device-1"
    assert config.trusted_keys == [signer.public_key_hex]
    assert (config.broker_host, config.broker_port) == ("broker.example", 8883)
    assert config.broker_tls_ca == str(ca)
    assert config.cloud_url == "http://fallback:9000"
    assert config.cloud_token is not None
    assert (
        verify_token(TrustStore([signer.public_key_hex]), config.cloud_token).device_id
        == "device-1"
    )
    # The control plane keeps a hash of the password, never the password itself.
    state = workdir / "enrollments.json"
    assert _mode(state) == 0o600
    assert config.broker_password and config.broker_password not in state.read_text()
    enrolled = load_enrollments(workdir)["device-1"]
    assert broker_auth.verify_password(config.broker_password, enrolled.password_hash)
    assert enrolled.labels == {"site": "berlin"}


def test_reenrolling_rotates_the_password(tmp_path: Path) -> None:
    workdir = tmp_path / "control"
    assert _enroll(workdir, "device-1", tmp_path / "a.json", "--label", "site=x") == 0
    first = json.loads((tmp_path / "a.json").read_text())["broker_password"]
    created = load_enrollments(workdir)["device-1"].created_at
    assert _enroll(workdir, "device-1", tmp_path / "b.json") == 0
    second = json.loads((tmp_path / "b.json").read_text())["broker_password"]
    enrolled = load_enrollments(workdir)["device-1"]
    assert first != second
    assert not broker_auth.verify_password(first, enrolled.password_hash)
    assert broker_auth.verify_password(second, enrolled.password_hash)
    assert (enrolled.created_at, enrolled.labels) == (created, {"site": "x"})


def test_broker_config_covers_every_enrolled_device(tmp_path: Path, capsys) -> None:
    workdir, out = tmp_path / "control", tmp_path / "broker"
    for device_id in ("device-1", "device-2"):
        assert _enroll(workdir, device_id, tmp_path / f"{device_id}.json") == 0
    pki = make_pki(tmp_path / "pki")
    tls = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--ca", str(pki.ca)]
    assert main(["broker", "config", "--workdir", str(workdir), "--out", str(out), *tls]) == 0
    for name in ("mosquitto.conf", "passwd", "acl"):
        assert _mode(out / name) == 0o600
    control = json.loads((workdir / "broker-control.json").read_text())
    assert _mode(workdir / "broker-control.json") == 0o600
    hashes = broker_auth.parse_password_file((out / "passwd").read_text())
    assert set(hashes) == {"device-1", "device-2", control["username"]}
    assert broker_auth.verify_password(control["password"], hashes[control["username"]])
    acl = broker_auth.parse_acl((out / "acl").read_text())
    assert acl["device-2"] == broker_auth.device_grants("device-2")
    assert acl[control["username"]] == broker_auth.control_grants()
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert conf[1] == "listener 1883"
    for line in ("allow_anonymous false", "use_username_as_clientid true", "persistence true"):
        assert line in conf
    assert f"certfile {pki.cert.resolve()}" in conf
    # Regenerating keeps the control plane's login; a revoked device drops out.
    assert main(["device", "revoke", "device-1", "--workdir", str(workdir)]) == 0
    assert main(["broker", "config", "--workdir", str(workdir), "--out", str(out)]) == 0
    assert json.loads((workdir / "broker-control.json").read_text()) == control
    assert set(broker_auth.parse_password_file((out / "passwd").read_text())) == {
        "device-2",
        control["username"],
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["device", "enroll", "../etc", "--out", "x.json"],
        ["device", "enroll", "_fogline-control", "--out", "x.json"],
        ["device", "enroll", "_fogline-control-2", "--out", "x.json"],  # a replica's login
        # Red team: these wrote a config whose token no verifier accepts (NaN and infinity
        # are not JSON; a negative lifetime is expired at birth), and said "enrolled".
        ["device", "enroll", "ok", "--out", "x.json", "--token-days", "nan"],
        ["device", "enroll", "ok", "--out", "x.json", "--token-days", "inf"],
        ["device", "enroll", "ok", "--out", "x.json", "--token-days", "-5"],
        ["device", "enroll", "ok", "--out", "x.json", "--token-days", "0"],
        ["device", "enroll", "a/b", "--out", "x.json"],
        ["device", "enroll", "ok", "--out", "x.json", "--label", "nokey"],
        ["device", "enroll", "ok", "--out", "x.json", "--label", "k=../v"],
        ["device", "revoke", "never-enrolled"],
        ["broker", "config", "--out", "b", "--tls-cert", "c.pem"],
        ["broker", "config", "--out", "b", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
        ["broker", "config", "--out", "b", "--ca", "ca.pem"],
        ["broker", "config", "--out", "b", "--port", "70000"],
        ["control", "serve", "--broker-username", "x"],
        ["control", "serve", "--broker-username", "x", "--broker-password-file", "missing"],
        ["control", "serve", "--broker-tls-ca", "missing.pem"],
    ],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path: Path, monkeypatch, capsys, argv) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--workdir", str(tmp_path / "control")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "x.json").exists()


def test_a_config_that_cannot_be_written_changes_nothing(tmp_path: Path, capsys) -> None:
    workdir = tmp_path / "control"
    assert _enroll(workdir, "device-1", tmp_path / "a.json") == 0
    before = load_enrollments(workdir)["device-1"].password_hash
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert _enroll(workdir, "device-1", blocker / "b.json") == 1
    assert load_enrollments(workdir)["device-1"].password_hash == before
    assert capsys.readouterr().err.startswith("error: ")
