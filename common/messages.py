"""JSON payloads on the device topics: commands, events, status, telemetry.

Commands are signed by the control plane and carry a per-device sequence
number and an expiry; the agent refuses a replayed, expired or out-of-order
one (``CommandGuard``). Events and status are plain JSON from the agent.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from common.errors import InvalidInputError, ReplayError
from common.json_object import parse_json_object
from common.signing import Signer, TrustStore

TRUST = "trust"  # a new signed keyring for the device (common.keyring)
DEPLOY = "deploy"  # body: package, artifact (the model is the package's name)
ROLLBACK = "rollback"  # body: {"model": NAME} (optional on a device with one model)
REMOVE = "remove"  # body: {"model": NAME}: stop serving it and delete its slots
SET_POLICY = "set-policy"  # body: {"model": NAME, "policy": common.policy.ModelPolicy}
COMMAND_TYPES = (DEPLOY, ROLLBACK, REMOVE, SET_POLICY, TRUST)

# Event stages of a deployment, in order; "failed" and "rejected" end it early.
STAGES = (
    "received",
    "downloading",
    "downloaded",
    "verified",
    "staged",
    "loaded",
    "self_tested",
    "activated",
)
FAILED = "failed"
REJECTED = "rejected"  # a command refused before it started (signature, seq, expiry)
CHUNK_REJECTED = "chunk_rejected"  # one damaged chunk; the download goes on
REMOVED = "removed"  # a remove command ended: the model is no longer served
POLICY_SET = "policy_set"  # a set-policy command ended: the policy is applied and kept
TRUSTED = "trusted"  # a trust command applied: the device now holds keyring ``keyring_version``


@dataclass(frozen=True)
class Command:
    type: str
    device_id: str
    seq: int
    expires_at: float
    body: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; ``body`` is shared, not copied (a deploy body holds the
        whole signed package, and a rollout signs one command per device)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def sign_command(cmd: Command, signer: Signer) -> bytes:
    doc = cmd.to_dict()
    return json.dumps(
        {"command": doc, "signature": signer.sign(doc), "key_id": signer.key_id}
    ).encode()


def parse_command(payload: bytes, trust: TrustStore, device_id: str) -> Command:
    """Decode and verify a signed command for this device (not yet its sequence)."""
    doc = parse_json_object(payload, "command")
    try:
        body, signature, signer = doc["command"], doc["signature"], doc["key_id"]
    except KeyError as exc:
        raise InvalidInputError(f"malformed command: missing {exc.args[0]!r}") from None
    trust.verify(body, signature, signer)
    try:
        cmd = Command(**body)
    except TypeError as exc:
        raise InvalidInputError(f"malformed command: {exc}") from exc
    if cmd.type not in COMMAND_TYPES:
        raise InvalidInputError(f"unknown command type {cmd.type!r}")
    if cmd.device_id != device_id:
        raise ReplayError(f"command {cmd.id} is for device {cmd.device_id!r}")
    return cmd


class CommandGuard:
    """Refuses expired, replayed and out-of-order commands.

    ``last_seq`` must be persisted by the caller after ``accept`` returns, so a
    restart cannot reopen the window for a replay.
    """

    def __init__(self, last_seq: int = 0, clock: Any = time.time) -> None:
        self.last_seq = last_seq
        self._clock = clock

    def check_fresh(self, cmd: Command) -> None:
        """Expiry only: for trust commands, which keyring versions order instead of ``seq``."""
        if cmd.expires_at < self._clock():
            raise ReplayError(f"command {cmd.id} expired")

    def accept(self, cmd: Command) -> None:
        self.check_fresh(cmd)
        if cmd.seq <= self.last_seq:
            raise ReplayError(f"command {cmd.id} seq {cmd.seq} <= last accepted {self.last_seq}")
        self.last_seq = cmd.seq


def event(
    device_id: str,
    command_id: str | None,
    stage: str,
    *,
    error: str | None = None,
    **fields: Any,
) -> bytes:
    doc: dict[str, Any] = {
        "device_id": device_id,
        "command_id": command_id,
        "stage": stage,
        "ts": time.time(),
        # The same event resent (outbox, QoS 1 redelivery) keeps its id: handled once.
        "event_id": uuid.uuid4().hex,
        **fields,
    }
    if error is not None:
        doc["error"] = error
    return json.dumps(doc).encode()


def status(
    device_id: str,
    online: bool,
    *,
    agent_version: str = "",
    hardware: dict[str, Any] | None = None,
    runtimes: list[str] | None = None,
    models: list[dict[str, Any]] | None = None,
    api_url: str | None = None,
    keyring_version: int = 0,
    labels: dict[str, str] | None = None,
) -> bytes:
    """``keyring_version`` lets the control plane send a device the keyrings it lacks."""
    return json.dumps(
        {
            "device_id": device_id,
            "state": "online" if online else "offline",
            "agent_version": agent_version,
            "hardware": hardware or {},
            "runtimes": runtimes or [],
            "models": models or [],
            "api_url": api_url,
            "keyring_version": keyring_version,
            "labels": labels or {},
            "ts": time.time(),
        }
    ).encode()


def chunk_request(device_id: str, digest: str, missing: list[int]) -> bytes:
    return json.dumps({"device_id": device_id, "artifact": digest, "missing": missing}).encode()
