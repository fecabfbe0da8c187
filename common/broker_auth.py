"""Broker identities and the ACL: who may connect, read and write which topic.

One source of truth for three readers: ``fogline broker config`` writes a
Mosquitto password file, ACL file and ``mosquitto.conf``; the embedded amqtt
broker reads the same two files and applies the same rules with ``allowed``.

- Passwords are stored as Mosquitto 2's ``$7$`` hashes (PBKDF2-HMAC-SHA512),
  made here with hashlib so no ``mosquitto_passwd`` is needed.
- A device may read only its own commands topic, the artifact chunk topics and
  its own repair topics, and write only its own status, telemetry and events
  topics and its own chunk request topics (so a request's device id is the
  broker's, not a claim). The control plane reads what devices write and writes
  what they read.
- The control plane's username starts with ``_``, which no device id may
  (``common.names``), so enrolling a device can never take it; with the
  broker forcing client id = username, nobody can take its session either.

NOTE: stdlib only: the embedded broker and the enrollment CLI both import this.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common import chunking, topics
from common.errors import InvalidInputError

CONTROL_USERNAME = "_fogline-control"
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes; the salt makes each hash unique
_SALT_BYTES = 12
# The broker drops a client that sends more: the largest chunk, plus its header and topic.
MAX_PACKET_SIZE = chunking.MAX_CHUNK_SIZE + 64 * 1024

Access = Literal["read", "write", "readwrite"]
Action = Literal["subscribe", "receive", "publish"]


@dataclass(frozen=True)
class Grant:
    access: Access
    topic: str  # a topic filter; wildcards allowed


@dataclass(frozen=True)
class TlsFiles:
    """A TLS listener: server certificate and key, and the CA that clients trust."""

    cert: Path
    key: Path
    ca: Path | None = None


# -- passwords ------------------------------------------------------------------------


def new_password() -> str:
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Mosquitto 2's ``$7$<iterations>$<salt b64>$<hash b64>`` (PBKDF2-HMAC-SHA512)."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True only for the right password against a ``$7$`` hash; any malformed hash is False."""
    try:
        _, kind, iterations, salt, digest = encoded.split("$")
        if kind != "7" or not 1 <= int(iterations) <= 1_000_000:
            return False
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt, validate=True), int(iterations)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def render_password_file(hashes: Mapping[str, str]) -> str:
    return "".join(f"{user}:{hashes[user]}\n" for user in sorted(hashes))


def parse_password_file(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            user, sep, encoded = line.partition(":")
            if not sep:
                raise InvalidInputError(f"malformed password file line for {user[:40]!r}")
            out[user] = encoded
    return out


# -- ACL ------------------------------------------------------------------------------


def device_grants(device_id: str) -> list[Grant]:
    """What one device may do; ``device_topic`` checks the id with ``check_name``."""
    return [
        Grant("read", topics.device_topic(device_id, "commands")),
        Grant("read", topics.all_artifacts_filter("chunks")),
        Grant("write", topics.device_topic(device_id, "status")),
        Grant("write", topics.device_topic(device_id, "telemetry")),
        Grant("write", topics.device_topic(device_id, "events")),
        Grant("write", topics.repair_filter("requests", device_id)),
        Grant("read", topics.repair_filter("repairs", device_id)),
    ]


def control_grants() -> list[Grant]:
    return [
        *(Grant("read", topics.all_devices_filter(k)) for k in ("status", "telemetry", "events")),
        Grant("read", topics.repair_filter("requests")),
        Grant("write", topics.all_devices_filter("commands")),
        Grant("write", topics.all_artifacts_filter("chunks")),
        Grant("write", topics.repair_filter("repairs")),
    ]


def render_acl(users: Mapping[str, Iterable[Grant]]) -> str:
    """Mosquitto ``acl_file`` text: one ``user`` block per identity, nothing for anyone else."""
    lines = ["# Generated by `fogline broker config`; regenerate rather than edit.", ""]
    for user in sorted(users):
        lines.append(f"user {user}")
        lines.extend(f"topic {g.access} {g.topic}" for g in users[user])
        lines.append("")
    return "\n".join(lines)


def parse_acl(text: str) -> dict[str, list[Grant]]:
    """Read back what ``render_acl`` writes (``user`` and ``topic`` lines only)."""
    users: dict[str, list[Grant]] = {}
    current: list[Grant] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user" and len(words) == 2:
            current = users.setdefault(words[1], [])
        elif words[0] == "topic" and len(words) == 3 and current is not None:
            if words[1] not in ("read", "write", "readwrite"):
                raise InvalidInputError(f"ACL line {number}: unknown access {words[1]!r}")
            current.append(Grant(words[1], words[2]))  # type: ignore[arg-type]
        else:
            raise InvalidInputError(f"ACL line {number}: cannot read {raw[:80]!r}")
    return users


def filter_covered(requested: str, grant: str) -> bool:
    """Every topic that ``requested`` matches is matched by ``grant`` (a topic covers itself)."""
    req, allowed = requested.split("/"), grant.split("/")
    for i, level in enumerate(allowed):
        if level == "#":
            return True
        if i >= len(req):
            return False
        if level == "+":
            if req[i] == "#":
                return False
        elif req[i] != level:
            return False
    return len(req) == len(allowed)


def allowed(grants: Iterable[Grant], topic: str, action: Action) -> bool:
    """May a user with ``grants`` subscribe to / receive on / publish to ``topic``?"""
    wanted = "write" if action == "publish" else "read"
    if action == "subscribe" and topic.startswith("$share/"):
        # A shared subscription ($share/{group}/{filter}, control-plane replicas) reads
        # what its filter reads, as Mosquitto 2 decides it.
        parts = topic.split("/", 2)
        if len(parts) < 3 or not parts[1] or "+" in parts[1] or "#" in parts[1]:
            return False
        topic = parts[2]
    return any(g.access in (wanted, "readwrite") and filter_covered(topic, g.topic) for g in grants)


# -- mosquitto.conf -------------------------------------------------------------------


def render_mosquitto_conf(
    *,
    port: int,
    password_file: Path,
    acl_file: Path,
    persistence_dir: Path,
    host: str | None = None,
    tls: TlsFiles | None = None,
    max_packet_size: int = MAX_PACKET_SIZE,
    run_as: str | None = None,
) -> str:
    """A Mosquitto 2 config: no anonymous clients, per-user ACL, persistent sessions.

    ``use_username_as_clientid`` binds each session to its credentials, so a
    device that connects with the control plane's client id gets its own.
    """
    # NOTE: the listener comes first: in Mosquitto 2.0 a listener option before any
    # ``listener`` line creates a second, default listener on port 1883.
    lines = [
        "# Generated by `fogline broker config`; regenerate rather than edit.",
        f"listener {port}" + (f" {host}" if host else ""),
    ]
    if tls is not None:
        lines += [f"certfile {tls.cert.resolve()}", f"keyfile {tls.key.resolve()}"]
        lines += [f"cafile {tls.ca.resolve()}"] if tls.ca else []
        lines.append("tls_version tlsv1.2")
    lines += [
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {password_file.resolve()}",
        f"acl_file {acl_file.resolve()}",
        "use_username_as_clientid true",
        # Commands queued for offline devices, and the control plane's own session,
        # survive a broker restart.
        "persistence true",
        f"persistence_location {persistence_dir.resolve()}/",
        # An artifact fans out as many QoS 1 chunks; the default queue (1000) could
        # drop chunks for a briefly slow agent, which would then have to ask again.
        "max_queued_messages 10000",
        f"max_packet_size {max_packet_size}",
        "log_dest stderr",
    ]
    if run_as:
        lines.append(f"user {run_as}")
    return "\n".join(lines) + "\n"
