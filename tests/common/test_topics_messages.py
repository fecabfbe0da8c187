"""Topics are built and parsed in one place; signed commands resist replay."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import messages, topics
from common.errors import InvalidInputError, ReplayError, VerificationError
from common.messages import Command, CommandGuard, parse_command, sign_command
from common.signing import Signer, TrustStore

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)


@given(device=ids, kind=st.sampled_from(topics.DEVICE_KINDS))
def test_device_topics_round_trip(device: str, kind: str) -> None:
    t = topics.parse(topics.device_topic(device, kind))
    assert (t.scope, t.ident, t.kind) == ("devices", device, kind)


def test_topic_layout_matches_design() -> None:
    assert topics.device_topic("d1", "status") == "fogline/v1/devices/d1/status"
    assert topics.artifact_topic("ab" * 32, "chunks") == f"fogline/v1/artifacts/{'ab' * 32}/chunks"
    assert topics.all_devices_filter("events") == "fogline/v1/devices/+/events"
    assert topics.shared(topics.all_devices_filter("events"), "control") == (
        "$share/control/fogline/v1/devices/+/events"
    )


@given(device=ids, kind=st.sampled_from(topics.REPAIR_KINDS))
def test_repair_topics_round_trip(device: str, kind: str) -> None:
    t = topics.parse(topics.repair_topic("ab" * 32, kind, device))
    assert (t.scope, t.ident, t.kind, t.device) == ("artifacts", "ab" * 32, kind, device)


def test_repair_topic_layout_matches_design() -> None:
    digest = "ab" * 32
    assert topics.repair_topic(digest, "requests", "d1") == (
        f"fogline/v1/artifacts/{digest}/requests/d1"
    )
    assert topics.repair_filter("repairs", "d1") == "fogline/v1/artifacts/+/repairs/d1"
    assert topics.repair_filter("requests") == "fogline/v1/artifacts/+/requests/+"


@pytest.mark.parametrize(
    "bad",
    [
        f"fogline/v1/artifacts/{'ab' * 32}/chunks/d1",  # the broadcast has no device
        f"fogline/v1/artifacts/{'ab' * 32}/requests",  # a request names its device
        f"fogline/v1/artifacts/{'ab' * 32}/requests/..",
        f"fogline/v1/artifacts/{'ab' * 32}/requests/+",
        "fogline/v1/artifacts/abc/requests/d1",
        f"fogline/v1/devices/d1/requests/{'ab' * 32}",
    ],
)
def test_malformed_repair_topics_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        topics.parse(bad)


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x y"])
def test_wildcards_and_separators_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        topics.device_topic(bad, "status")
    with pytest.raises(ValueError):
        topics.repair_topic("ab" * 32, "requests", bad)


def _signed(signer: Signer, seq: int, expires: float = 2e9, device: str = "d1") -> bytes:
    return sign_command(Command("deploy", device, seq, expires, {"x": 1}), signer)


def test_command_signature_sequence_and_expiry() -> None:
    signer = Signer.generate()
    trust = TrustStore([signer.public_key_hex])
    guard = CommandGuard(0, clock=lambda: 1000.0)
    guard.accept(parse_command(_signed(signer, 1), trust, "d1"))
    with pytest.raises(ReplayError, match="seq"):
        guard.accept(parse_command(_signed(signer, 1), trust, "d1"))  # replay
    with pytest.raises(ReplayError, match="expired"):
        guard.accept(parse_command(_signed(signer, 5, expires=999.0), trust, "d1"))
    with pytest.raises(ReplayError, match="for device"):
        parse_command(_signed(signer, 6, device="d2"), trust, "d1")
    with pytest.raises(VerificationError):
        parse_command(_signed(Signer.generate(), 7), trust, "d1")
    with pytest.raises(InvalidInputError):
        parse_command(b"{not json", trust, "d1")
    assert guard.last_seq == 1


def test_status_payload_says_online_or_offline() -> None:
    assert b'"state": "offline"' in messages.status("d1", online=False)
