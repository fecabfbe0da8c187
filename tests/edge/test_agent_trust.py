"""The agent's trust at start: anchors, the enrollment keyring, the keyrings it kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud.keys import KeyStore, enrollment_trust
from common.errors import InvalidInputError
from common.keyring import Keyring, sign_keyring
from common.signing import Signer, TrustedKey
from edge.agent import EdgeAgent
from edge.config import AgentConfig


def config(tmp_path: Path, **doc: object) -> AgentConfig:
    base = {"device_id": "d1", "state_dir": str(tmp_path / "state"), "model": "toy"}
    return AgentConfig.from_dict({**base, **doc})


def rotated_workdir(tmp_path: Path) -> KeyStore:
    store = KeyStore(tmp_path / "control")
    first = store.create()
    store.rotate()
    store.retire(first.key_id)
    return store


def test_enrolled_after_a_rotation_the_agent_starts_at_the_fleets_keyring(tmp_path) -> None:
    store = rotated_workdir(tmp_path)
    agent = EdgeAgent(config(tmp_path, **enrollment_trust(store.dir.parent)))
    assert agent.trust.version == 3
    assert [k.key_id for k in agent.trust.keys] == [store.signer().key_id]


@pytest.mark.parametrize("case", ["forged keyring", "bad key", "not a keyring"])
def test_bad_enrollment_trust_is_a_config_error(tmp_path, case) -> None:
    store = rotated_workdir(tmp_path)
    doc = enrollment_trust(store.dir.parent)
    if case == "forged keyring":
        stranger = Signer.generate()
        key = TrustedKey(stranger.key_id, stranger.public_key_hex, "control")
        doc["trusted_keyring"] = sign_keyring(Keyring(9, (key,)), stranger)
    elif case == "bad key":
        doc["trusted_keys"] = ["not hex"]
    else:
        doc["trusted_keyring"] = {"keyring": "x"}
    with pytest.raises(InvalidInputError, match="agent config"):
        config(tmp_path, **doc)


def test_kept_keyrings_are_checked_again_from_the_anchors(tmp_path, caplog) -> None:
    store = rotated_workdir(tmp_path)
    first_key = Keyring.from_dict(store.history()[0]["keyring"]).keys[0].public_key
    cfg = config(tmp_path, trusted_keys=[first_key])
    state = cfg.state_dir
    state.mkdir(parents=True)
    (state / "keyring.json").write_text(json.dumps({"keyrings": store.history()}))
    assert EdgeAgent(cfg).trust.version == 3
    # Someone with write access to the state dir adds a keyring of their own: not applied.
    stranger = Signer.generate()
    key = TrustedKey(stranger.key_id, stranger.public_key_hex, "control")
    forged = [*store.history(), sign_keyring(Keyring(4, (key,)), stranger)]
    (state / "keyring.json").write_text(json.dumps({"keyrings": forged}))
    agent = EdgeAgent(cfg)
    assert agent.trust.version == 0 and "keyring.json" in caplog.text
    (state / "keyring.json").write_text("{")
    assert EdgeAgent(cfg).trust.version == 0


def test_fogline_device_enroll_writes_the_fleets_keyring(tmp_path) -> None:
    from fogline.cli import main

    store = rotated_workdir(tmp_path)
    out = tmp_path / "dev-9.json"
    argv = ["device", "enroll", "dev-9", "--workdir", str(store.dir.parent), "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["trusted_keys"] == [store.signer().public_key_hex]
    doc["state_dir"] = str(tmp_path / "dev-9")
    agent = EdgeAgent(AgentConfig.from_dict(doc))
    assert agent.trust.version == 3  # not 0: an older keyring is refused from the start
