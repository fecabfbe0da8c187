"""MQTT topics: the only place topic strings are built or parsed.

Layout (DESIGN.md): ``fogline/v1/devices/{d}/{status|telemetry|commands|events}``,
``fogline/v1/artifacts/{a}/chunks`` (the broadcast) and
``fogline/v1/artifacts/{a}/{requests|repairs}/{d}`` (one device's repair: the
device id in the topic is the broker ACL's, never a claim in the payload).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.names import check_digest, check_name

ROOT = "fogline/v1"
DEVICE_KINDS = ("status", "telemetry", "commands", "events")
ARTIFACT_KINDS = ("chunks",)
REPAIR_KINDS = ("requests", "repairs")  # per artifact and device: asked by d, answered to d


def device_topic(device_id: str, kind: str) -> str:
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}")
    return f"{ROOT}/devices/{check_name(device_id, 'device id')}/{kind}"


def artifact_topic(digest: str, kind: str) -> str:
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact topic kind {kind!r}")
    return f"{ROOT}/artifacts/{check_digest(digest)}/{kind}"


def repair_topic(digest: str, kind: str, device_id: str) -> str:
    """``requests``: what device ``device_id`` lacks; ``repairs``: those chunks, to it alone."""
    if kind not in REPAIR_KINDS:
        raise ValueError(f"unknown repair topic kind {kind!r}")
    device = check_name(device_id, "device id")
    return f"{ROOT}/artifacts/{check_digest(digest)}/{kind}/{device}"


def repair_filter(kind: str, device_id: str | None = None) -> str:
    """Every artifact's ``kind`` topic of one device, or (no id) of every device."""
    if kind not in REPAIR_KINDS:
        raise ValueError(f"unknown repair topic kind {kind!r}")
    device = "+" if device_id is None else check_name(device_id, "device id")
    return f"{ROOT}/artifacts/+/{kind}/{device}"


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
    device: str | None = None  # the device of an artifact's requests/repairs topic


def parse(topic: str) -> Topic:
    """Parse a Fogline topic; raise ValueError for anything else."""
    parts = topic.split("/")
    if len(parts) == 6 and "/".join(parts[:3]) == f"{ROOT}/artifacts" and parts[4] in REPAIR_KINDS:
        device = check_name(parts[5], "device id")
        return Topic("artifacts", check_digest(parts[3]), parts[4], device)
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
