"""The broker's identities and ACL as plain values: hashes, grants, file formats."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import broker_auth, topics
from common.broker_auth import Grant, allowed, filter_covered

DIGEST = "0f" * 32


@pytest.mark.parametrize(
    ("requested", "grant", "covered"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/+/c", True),
        ("a/+/c", "a/+/c", True),
        ("a/#", "a/+/c", False),
        ("a/+/c", "a/b/c", False),
        ("#", "a/#", False),
        ("a/b", "a/#", True),
        ("a", "a/#", True),  # "#" also matches its parent level
        ("a/b/c/d", "a/+/c", False),
        ("a/b", "a/+/c", False),
        ("a/x/c", "a/b/c", False),
        ("a/#", "#", True),
    ],
)
def test_filter_covered(requested: str, grant: str, covered: bool) -> None:
    assert filter_covered(requested, grant) is covered


def _device_table() -> list[tuple[str, str, bool]]:
    own, other = "device-1", "device-2"
    rows = [(topics.device_topic(own, "commands"), "subscribe", True)]
    rows += [(topics.device_topic(own, "commands"), "receive", True)]
    rows += [(topics.artifact_topic(DIGEST, "chunks"), "receive", True)]
    rows += [(topics.all_artifacts_filter("chunks"), "subscribe", True)]
    rows += [(topics.repair_topic(DIGEST, "requests", own), "publish", True)]
    rows += [(topics.repair_topic(DIGEST, "requests", other), "publish", False)]
    rows += [(topics.repair_topic(DIGEST, "repairs", own), "receive", True)]
    rows += [(topics.repair_filter("repairs", own), "subscribe", True)]
    rows += [(topics.repair_topic(DIGEST, "repairs", other), "receive", False)]
    rows += [(topics.repair_filter("repairs"), "subscribe", False)]
    rows += [(topics.repair_topic(DIGEST, "repairs", own), "publish", False)]
    rows += [(topics.repair_filter("requests"), "subscribe", False)]
    rows += [(topics.device_topic(own, k), "publish", True) for k in ("status", "telemetry")]
    rows += [(topics.device_topic(own, "events"), "publish", True)]
    rows += [(topics.device_topic(other, k), "publish", False) for k in topics.DEVICE_KINDS]
    rows += [(topics.device_topic(other, k), "receive", False) for k in topics.DEVICE_KINDS]
    rows += [(topics.device_topic(own, "commands"), "publish", False)]
    rows += [(topics.artifact_topic(DIGEST, "chunks"), "publish", False)]
    rows += [(topics.all_devices_filter("commands"), "subscribe", False)]
    rows += [("#", "subscribe", False), ("fogline/v1/#", "subscribe", False)]
    return rows


@pytest.mark.parametrize(("topic", "action", "ok"), _device_table())
def test_device_grants(topic: str, action: broker_auth.Action, ok: bool) -> None:
    assert allowed(broker_auth.device_grants("device-1"), topic, action) is ok


def test_control_grants_are_the_mirror_of_a_devices() -> None:
    grants = broker_auth.control_grants()
    assert allowed(grants, topics.device_topic("d", "commands"), "publish")
    assert allowed(grants, topics.artifact_topic(DIGEST, "chunks"), "publish")
    assert allowed(grants, topics.repair_topic(DIGEST, "repairs", "d"), "publish")
    assert allowed(grants, topics.repair_filter("requests"), "subscribe")
    assert not allowed(grants, topics.repair_topic(DIGEST, "requests", "d"), "publish")
    for kind in ("status", "telemetry", "events"):
        assert allowed(grants, topics.all_devices_filter(kind), "subscribe")
        assert not allowed(grants, topics.device_topic("d", kind), "publish")
    assert not allowed(grants, topics.device_topic("d", "commands"), "receive")


def test_device_ids_are_checked_and_cannot_be_the_control_plane() -> None:
    with pytest.raises(ValueError):
        broker_auth.device_grants("+")
    with pytest.raises(ValueError):
        broker_auth.device_grants(broker_auth.CONTROL_USERNAME)


def test_password_hash_verifies_only_the_password() -> None:
    encoded = broker_auth.hash_password("s3cret")
    assert encoded.startswith("$7$101$")
    assert broker_auth.verify_password("s3cret", encoded)
    assert not broker_auth.verify_password("s3cret ", encoded)
    assert broker_auth.hash_password("s3cret") != encoded  # salted
    for bad in ("", "$7$", "$6$101$AAAA$BBBB", "$7$x$AAAA$BBBB", "$7$101$!!$??"):
        assert not broker_auth.verify_password("s3cret", bad)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="no mosquitto_passwd")
def test_hashes_are_mosquitto_passwd_compatible(tmp_path) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "pw"], check=True)
    encoded = broker_auth.parse_password_file(path.read_text())["alice"]
    assert broker_auth.verify_password("pw", encoded)


_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)


@given(st.lists(_ids, unique=True, max_size=5))
def test_acl_round_trip(device_ids: list[str]) -> None:
    users = {d: broker_auth.device_grants(d) for d in device_ids}
    users[broker_auth.CONTROL_USERNAME] = broker_auth.control_grants()
    assert broker_auth.parse_acl(broker_auth.render_acl(users)) == users


@given(st.dictionaries(_ids, st.text(min_size=1, max_size=30).map(broker_auth.hash_password)))
def test_password_file_round_trip(hashes: dict[str, str]) -> None:
    assert broker_auth.parse_password_file(broker_auth.render_password_file(hashes)) == hashes


def test_acl_parse_refuses_what_it_does_not_know() -> None:
    for text in ("topic read a/b", "user x\ntopic delete a/b", "pattern read a/%u"):
        with pytest.raises(ValueError):
            broker_auth.parse_acl(text)
    assert broker_auth.parse_acl("# c\nuser x\ntopic readwrite a/#\n") == {
        "x": [Grant("readwrite", "a/#")]
    }
