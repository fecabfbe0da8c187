"""MQTT topics: the only place topic strings are built or parsed.

Layout (DESIGN.md): ``fogline/v1/devices/{d}/{status|telemetry|commands|events}``
and ``fogline/v1/artifacts/{a}/{chunks|requests}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.names import check_digest, check_name

ROOT = "fogline/v1"
DEVICE_KINDS = ("status", "telemetry", "commands", "events")
ARTIFACT_KINDS = ("chunks", "requests")


def device_topic(device_id: str, kind: str) -> str:
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}")
    return f"{ROOT}/devices/{check_name(device_id, 'device id')}/{kind}"


def artifact_topic(digest: str, kind: str) -> str:
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact topic kind {kind!r}")
    return f"{ROOT}/artifacts/{check_digest(digest)}/{kind}"


def all_devices_filter(kind: str) -> str:
    """Subscription filter for one kind of message from every device."""
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}")
    return f"{ROOT}/devices/+/{kind}"


def all_artifacts_filter(kind: str) -> str:
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact topic kind {kind!r}")
    return f"{ROOT}/artifacts/+/{kind}"


def shared(filter_: str, group: str) -> str:
    """An MQTT 5 shared subscription filter, for control-plane replicas."""
    return f"$share/{check_name(group, 'share group')}/{filter_}"


@dataclass(frozen=True)
class Topic:
    scope: str  # "devices" | "artifacts"
    ident: str  # device id or artifact digest
    kind: str


def parse(topic: str) -> Topic:
    """Parse a Fogline topic; raise ValueError for anything else."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != ROOT:
        raise ValueError(f"not a fogline topic: {topic!r}")
    scope, ident, kind = parts[2], parts[3], parts[4]
    kinds = {"devices": DEVICE_KINDS, "artifacts": ARTIFACT_KINDS}.get(scope)
    if kinds is None or kind not in kinds:
        raise ValueError(f"not a fogline topic: {topic!r}")
    if scope == "devices":
        check_name(ident, "device id")
    else:
        check_digest(ident)
    return Topic(scope, ident, kind)
