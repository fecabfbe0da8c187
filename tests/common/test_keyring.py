"""Keyrings and the TrustStore: rotation, retirement, revocation, rollback, bad input."""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import InvalidInputError, ReplayError, VerificationError
from common.keyring import (
    Keyring,
    apply_chain,
    apply_keyring,
    sign_keyring,
    trust_command,
    verify_trust_command,
)
from common.messages import Command, sign_command
from common.signing import Signer, TrustedKey, TrustStore

OLD, NEW, RELEASE, STRANGER = (Signer.generate() for _ in range(4))


def tk(signer: Signer, role: str = "control") -> TrustedKey:
    return TrustedKey(signer.key_id, signer.public_key_hex, role)


def ring(version: int, keys: list[TrustedKey], retired=(), revoked=()) -> Keyring:
    return Keyring(version, tuple(keys), tuple(retired), tuple(revoked))


# The life of a fleet's keys: created, a release key added, rotated, old retired, revoked.
V1 = sign_keyring(ring(1, [tk(OLD)]), OLD)
V2 = sign_keyring(ring(2, [tk(OLD), tk(RELEASE, "release")]), OLD)
V3 = sign_keyring(ring(3, [tk(OLD), tk(NEW), tk(RELEASE, "release")]), OLD)  # rotate
V4 = sign_keyring(ring(4, [tk(NEW), tk(RELEASE, "release")], retired=[tk(OLD)]), NEW)
V5 = sign_keyring(ring(5, [tk(NEW), tk(RELEASE, "release")], revoked=[OLD.key_id]), NEW)
CHAIN = [V1, V2, V3, V4, V5]


def anchored() -> TrustStore:
    return TrustStore([OLD.public_key_hex])


def sig_of(signer: Signer, doc: Any = None) -> tuple[Any, str, str]:
    doc = doc if doc is not None else {"hello": signer.key_id}
    return doc, signer.sign(doc), signer.key_id


# (keyring version reached, signer, purpose) -> verifies?
@pytest.mark.parametrize(
    ("upto", "signer", "purpose", "ok"),
    [
        (0, OLD, "command", True),
        (0, NEW, "command", False),  # not yet known
        (2, RELEASE, "manifest", True),
        (2, RELEASE, "command", False),  # a release key signs manifests only
        (2, OLD, "release", False),  # an offline upload must carry a release key's signature
        (2, RELEASE, "release", True),
        (3, NEW, "command", True),  # rotated: the new key is learned from the old
        (3, OLD, "command", True),  # both trusted until the old one is retired
        (4, OLD, "command", False),  # retired: signs nothing new
        (4, OLD, "manifest", False),
        (4, OLD, "installed", True),  # but a package installed earlier still loads
        (4, OLD, "token", True),  # and a device token issued earlier still works
        (5, OLD, "installed", False),  # revoked: nothing, ever
        (5, OLD, "token", False),
        (5, NEW, "command", True),
        (5, STRANGER, "manifest", False),
    ],
)
def test_what_each_keyring_version_trusts(upto, signer, purpose, ok) -> None:
    trust = anchored()
    if upto:
        trust, applied = apply_chain(trust, CHAIN[:upto])
        assert [d["keyring"]["version"] for d in applied] == list(range(1, upto + 1))
    assert trust.version == upto
    if ok:
        trust.verify(*sig_of(signer), purpose=purpose)
    else:
        with pytest.raises(VerificationError):
            trust.verify(*sig_of(signer), purpose=purpose)


def test_a_revoked_key_is_named_in_the_error() -> None:
    trust, _ = apply_chain(anchored(), CHAIN)
    with pytest.raises(VerificationError, match="revoked"):
        trust.verify(*sig_of(OLD), purpose="installed")


def _tampered(doc: dict, **changes: Any) -> dict:
    out = copy.deepcopy(doc)
    out["keyring"].update(changes)
    return out


def _signed_raw(changes: dict[str, Any]) -> dict[str, Any]:
    """A keyring document with ``changes`` applied, signed by OLD (validation must refuse)."""
    doc = {**ring(1, [tk(OLD)]).to_dict(), **changes}
    return {"keyring": doc, "signature": OLD.sign(doc), "key_id": OLD.key_id}


BAD_KEYRINGS = [
    (0, sign_keyring(ring(1, [tk(STRANGER)]), STRANGER), VerificationError, "untrusted"),
    (0, _tampered(V1, keys=[tk(STRANGER).to_dict()]), VerificationError, "bad signature"),
    (3, V2, ReplayError, "not newer"),  # rollback of the keyring
    (3, V3, ReplayError, "not newer"),  # replay
    (2, sign_keyring(ring(3, [tk(OLD)]), RELEASE), VerificationError, "release key"),
    (4, sign_keyring(ring(5, [tk(OLD)]), OLD), VerificationError, "untrusted"),  # retired
    (5, sign_keyring(ring(6, [tk(OLD)]), OLD), VerificationError, "revoked"),
    (5, sign_keyring(ring(6, [tk(NEW), tk(OLD)]), NEW), VerificationError, "un-revoke"),
    (0, {"keyring": {}}, InvalidInputError, "malformed"),
    (0, {"keyring": {"schema": "x"}, "signature": "", "key_id": ""}, InvalidInputError, "schema"),
    (0, sign_keyring(ring(1, [tk(RELEASE, "release")]), OLD), InvalidInputError, "control"),
    (0, _signed_raw({"version": 0}), InvalidInputError, "version"),
    (0, _signed_raw({"version": True}), InvalidInputError, "version"),
    (0, _signed_raw({"keys": "all"}), InvalidInputError, "keys"),
    (
        0,
        _signed_raw({"keys": [{**tk(OLD).to_dict(), "key_id": "0" * 16}]}),
        InvalidInputError,
        "!=",
    ),
    (
        0,
        _signed_raw({"keys": [{**tk(OLD).to_dict(), "role": "god"}]}),
        InvalidInputError,
        "bad key",
    ),
    (
        0,
        _signed_raw({"keys": [{**tk(OLD).to_dict(), "public_key": "zz" * 32}]}),
        InvalidInputError,
        "hex",
    ),
    (0, _signed_raw({"keys": [tk(OLD).to_dict()] * 2}), InvalidInputError, "twice"),
    (0, _signed_raw({"revoked": [OLD.key_id]}), InvalidInputError, "revokes"),
    (0, _signed_raw({"revoked": [7]}), InvalidInputError, "revoked"),
    (0, _signed_raw({"issued_at": "soon"}), InvalidInputError, "issued_at"),
]


@pytest.mark.parametrize(("start", "signed", "error", "match"), BAD_KEYRINGS)
def test_bad_keyrings_are_refused_and_change_nothing(start, signed, error, match) -> None:
    trust, _ = apply_chain(anchored(), CHAIN[:start]) if start else (anchored(), [])
    before = (trust.version, trust.keys, trust.revoked)
    with pytest.raises(error, match=match):
        apply_keyring(trust, signed)
    assert (trust.version, trust.keys, trust.revoked) == before


def test_a_chain_skips_steps_this_host_cannot_check_but_needs_the_newest() -> None:
    # Enrolled after the rotation: anchored on NEW only, it cannot check V1-V3 (OLD's).
    fresh = TrustStore([NEW.public_key_hex])
    trust, applied = apply_chain(fresh, CHAIN)
    assert trust.version == 5 and [d["keyring"]["version"] for d in applied] == [4, 5]
    forged = sign_keyring(ring(6, [tk(STRANGER)]), STRANGER)
    with pytest.raises(VerificationError, match="untrusted"):
        apply_chain(trust, [*CHAIN, forged])
    with pytest.raises(ReplayError):
        apply_chain(trust, CHAIN)
    assert apply_chain(trust, CHAIN, require_newer=False) == (trust, [])
    for bad in ([], "chain", [{"keyring": {"version": "2"}}]):
        with pytest.raises(InvalidInputError):
            apply_chain(trust, bad)


def test_adopt_changes_the_store_in_place() -> None:
    trust = anchored()
    shared = trust  # e.g. the model store holds the same object
    new, _ = apply_chain(trust, CHAIN)
    trust.adopt(new)
    assert shared.version == 5 and {k.key_id for k in shared.keys} == {NEW.key_id, RELEASE.key_id}


def test_trust_command_is_checked_against_the_trust_its_keyrings_lead_to() -> None:
    trust, _ = apply_chain(anchored(), CHAIN[:2])
    # Signed by NEW, which this device learns from V3 in the same command.
    payload = trust_command("d1", CHAIN, NEW)
    cmd, new, applied = verify_trust_command(payload, trust, "d1")
    assert cmd.type == "trust" and new.version == 5 and len(applied) == 3
    assert trust.version == 2  # nothing committed by the check itself
    for bad_signer, device in ((STRANGER, "d1"), (NEW, "d2")):
        with pytest.raises(VerificationError):
            verify_trust_command(trust_command("d1", CHAIN, bad_signer), trust, device)
    # A deploy command is not a trust command, even with keyrings in its body.
    deploy = Command("deploy", "d1", 1, time.time() + 60, {"keyrings": CHAIN})
    with pytest.raises(InvalidInputError, match="expected a trust command"):
        verify_trust_command(sign_command(deploy, NEW), trust, "d1")
    with pytest.raises(InvalidInputError, match="keyrings"):
        verify_trust_command(b'{"command": {"body": {}}}', trust, "d1")


KEYS = [Signer.generate() for _ in range(6)]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@given(
    version=st.integers(1, 2**40),
    picks=st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from(["control", "release"]), st.integers(0, 2)),
        min_size=1,
        max_size=6,
        unique_by=lambda p: p[0],
    ),
)
def test_keyring_round_trips(version, picks) -> None:
    chosen = [
        (TrustedKey(KEYS[i].key_id, KEYS[i].public_key_hex, role), where)
        for i, role, where in picks
    ]
    keys = [k for k, where in chosen if where == 0]
    control = TrustedKey(OLD.key_id, OLD.public_key_hex)
    ring = Keyring(
        version,
        (control, *keys),
        tuple(k for k, where in chosen if where == 1),
        tuple(k.key_id for k, where in chosen if where == 2),
        1.5,
    )
    assert Keyring.from_dict(ring.to_dict()) == Keyring(
        ring.version, ring.keys, ring.retired, tuple(sorted(ring.revoked)), 1.5
    )


@given(
    doc=json_values, field=st.sampled_from(["version", "keys", "retired", "revoked", "issued_at"])
)
def test_any_json_in_a_keyring_field_is_accepted_or_a_clear_error(doc, field) -> None:
    raw = {**ring(1, [tk(OLD)]).to_dict(), field: doc}
    with contextlib.suppress(InvalidInputError):  # any other exception fails the test
        Keyring.from_dict(raw)
