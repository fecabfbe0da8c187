"""Device enrollment and the broker's identities, kept in the control plane's workdir.

Offline by design: ``fogline device enroll`` and ``fogline broker config`` run
on the control plane's host, against its state, with no server involved.

State lives in ``WORKDIR/enrollments.json`` (0600), not in the control
plane's database: its one reader is ``fogline broker config``, which must run
where the broker's files are written and need not reach PostgreSQL; and a
flat file is what a broker's password file is regenerated from anyway. It
holds each device's broker password *hash* only; the plaintext is written
once, into that device's config file (0600). The control plane's own broker
credentials are ``WORKDIR/broker-control.json`` (0600), read by
``fogline control serve``.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cloud.keys import KeyStore, enrollment_trust, trusted_public_keys
from common import broker_auth
from common.broker_auth import CONTROL_USERNAME, TlsFiles
from common.device_token import DEFAULT_LIFETIME_S, issue_token
from common.errors import InvalidInputError
from common.fsutil import write_private
from common.names import check_name
from common.revocations import Revocations

ENROLLMENTS_FILE = "enrollments.json"
REVOCATIONS_FILE = "revocations.json"  # devices whose tokens no verifier may accept
CONTROL_CREDENTIALS_FILE = "broker-control.json"


@dataclass(frozen=True)
class Enrollment:
    device_id: str
    password_hash: str
    created_at: float
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentSettings:
    """What an enrolled device's config says besides its identity (all optional flags)."""

    model: str = "digits"
    state_dir: str | None = None  # default: /var/lib/fogline/<device id>
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_tls_ca: str | None = None
    fallback_url: str | None = None
    control_url: str | None = None  # where the device sends hard examples
    token_lifetime_s: float = DEFAULT_LIFETIME_S


def signing_key_path(workdir: Path) -> Path:
    return workdir / "keys" / "signing.pem"


def trusted_keys(workdir: Path) -> list[str]:
    """The public keys an enrolled device trusts: the current keyring's control keys."""
    KeyStore(workdir).open_or_create()  # keys/ made on first use, as the control plane does
    return trusted_public_keys(workdir)


def parse_labels(pairs: list[str] | None) -> dict[str, str]:
    """``["site=berlin", ...]`` as a dict; keys and values are checked names."""
    labels: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInputError(f"label {pair[:80]!r} must be KEY=VALUE")
        labels[check_name(key, "label key")] = check_name(value, "label value")
    return labels


# -- the enrollments file -------------------------------------------------------------


@contextmanager
def _locked(workdir: Path) -> Iterator[None]:
    """One writer at a time: two enrollments at once must not lose one of them."""
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / ".enrollments.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load_enrollments(workdir: Path) -> dict[str, Enrollment]:
    path = workdir / ENROLLMENTS_FILE
    try:
        doc = json.loads(path.read_text())
        return {d: Enrollment(**e) for d, e in doc["devices"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"cannot read {path}: {exc}") from exc


def _save_enrollments(workdir: Path, enrollments: dict[str, Enrollment]) -> None:
    doc = {"devices": {d: asdict(e) for d, e in sorted(enrollments.items())}}
    write_private(workdir / ENROLLMENTS_FILE, json.dumps(doc, indent=2).encode())


def enroll_device(
    workdir: Path,
    device_id: str,
    settings: AgentSettings,
    labels: dict[str, str] | None = None,
    *,
    out: Path | None = None,
) -> dict[str, Any]:
    """Enroll (or re-enroll, rotating its password) a device; return its agent config.

    The config holds the only copy of the broker password. With ``out`` it is
    written there (0600) *before* the new hash is saved, so a config that
    could not be written never locks the device out.
    """
    check_name(device_id, "device id")
    password = broker_auth.new_password()
    config = _agent_config(workdir, device_id, password, settings)
    with _locked(workdir):
        enrollments = load_enrollments(workdir)
        old = enrollments.get(device_id)
        kept = labels if labels is not None else (old.labels if old else {})
        enrollments[device_id] = Enrollment(
            device_id=device_id,
            password_hash=broker_auth.hash_password(password),
            created_at=old.created_at if old else round(time.time(), 3),
            labels=kept,
        )
        if kept:
            config["labels"] = dict(kept)  # reported in the agent's status
        if out is not None:
            write_agent_config(out, config)
        _save_enrollments(workdir, enrollments)
    return config


def _agent_config(
    workdir: Path, device_id: str, password: str, settings: AgentSettings
) -> dict[str, Any]:
    signer = KeyStore(workdir).open_or_create()  # the active key signs the device's token
    config: dict[str, Any] = {
        "device_id": device_id,
        "state_dir": settings.state_dir or f"/var/lib/fogline/{device_id}",
        # The anchors and the current signed keyring: the device starts at the fleet's
        # keyring version (never accepts an older one) and knows the release keys.
        **enrollment_trust(workdir),
        "model": settings.model,
        "broker_host": settings.broker_host,
        "broker_port": settings.broker_port,
        "broker_username": device_id,
        "broker_password": password,
        "cloud_url": settings.fallback_url,
        "cloud_token": issue_token(signer, device_id, lifetime_s=settings.token_lifetime_s),
    }
    if settings.broker_tls_ca:
        config["broker_tls_ca"] = settings.broker_tls_ca
    if settings.control_url:
        config["control_url"] = settings.control_url
    return config


def write_agent_config(path: Path, config: dict[str, Any]) -> None:
    """The device's config holds its broker password and token: 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, (json.dumps(config, indent=2) + "\n").encode())


def revoke_device(workdir: Path, device_id: str) -> None:
    """Forget a device and revoke the tokens it holds.

    Its broker login goes when the broker config is regenerated; its fallback
    tokens at once on the control plane, and on each fallback at its next refresh
    (``--key-refresh-s``), through the revocation list.
    """
    with _locked(workdir):
        enrollments = load_enrollments(workdir)
        if enrollments.pop(check_name(device_id, "device id"), None) is None:
            raise InvalidInputError(f"device {device_id!r} is not enrolled")
        revoked = load_revocations(workdir).with_device(device_id, time.time())
        # The list first: a crash in between leaves a device revoked but still
        # enrolled (revoke again), never forgotten but with working tokens.
        write_private(workdir / REVOCATIONS_FILE, json.dumps(revoked.to_doc()).encode())
        _save_enrollments(workdir, enrollments)


def load_revocations(workdir: Path) -> Revocations:
    """The revoked devices (unsigned on the host; the control plane signs what it serves)."""
    path = workdir / REVOCATIONS_FILE
    try:
        return Revocations.from_doc(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return Revocations()
    except (OSError, ValueError) as exc:  # InvalidInputError is a ValueError
        raise InvalidInputError(f"cannot read {path}: {exc}") from exc


class RevokedDevices:
    """The control plane's view of ``revocations.json``, read again when it changes."""

    def __init__(self, workdir: Path) -> None:
        self._path = workdir / REVOCATIONS_FILE
        self._stamp: tuple[int, int] | None = None
        self._current = Revocations()

    def current(self) -> Revocations:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return Revocations()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._current = load_revocations(self._path.parent)
            self._stamp = stamp
        return self._current


# -- the control plane's broker identity and the broker's files -----------------------


@dataclass(frozen=True)
class BrokerCredentials:
    username: str
    password: str


MAX_CONTROL_REPLICAS = 64


def control_login_name(replica: int = 1) -> tuple[str, str]:
    """(broker username, credentials file name) of control-plane replica ``replica``.

    Each replica needs its own login: the broker forces client id = username, so two
    replicas sharing one would take each other's session over and over. Replica 1
    keeps the names a single control plane has always had.
    """
    if not 1 <= replica <= MAX_CONTROL_REPLICAS:
        raise InvalidInputError(f"replica {replica} is not in 1..{MAX_CONTROL_REPLICAS}")
    if replica == 1:
        return CONTROL_USERNAME, CONTROL_CREDENTIALS_FILE
    return f"{CONTROL_USERNAME}-{replica}", f"broker-control-{replica}.json"


def control_credentials(
    workdir: Path, *, replica: int = 1, rotate: bool = False
) -> BrokerCredentials:
    """Replica ``replica``'s broker login, created on first use (``rotate``: a new password)."""
    username, filename = control_login_name(replica)
    path = workdir / filename
    with _locked(workdir):
        if path.exists() and not rotate:
            return read_control_credentials(path)
        creds = BrokerCredentials(username, broker_auth.new_password())
        write_private(path, json.dumps(asdict(creds), indent=2).encode())
    return creds


def read_control_credentials(path: Path) -> BrokerCredentials:
    try:
        doc = json.loads(path.read_text())
        return BrokerCredentials(str(doc["username"]), str(doc["password"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"cannot read broker credentials {path}: {exc}") from exc


@dataclass(frozen=True)
class BrokerFiles:
    conf: Path
    password_file: Path
    acl_file: Path
    persistence_dir: Path


def write_broker_config(
    workdir: Path,
    out: Path,
    *,
    port: int = 1883,
    host: str | None = None,
    tls: TlsFiles | None = None,
    run_as: str | None = None,
    control_replicas: int = 1,
) -> BrokerFiles:
    """``mosquitto.conf``, ``passwd`` (0600) and ``acl`` in ``out`` for every enrolled device
    and ``control_replicas`` control-plane logins (see ``control_login_name``)."""
    if tls is not None:
        for f in (tls.cert, tls.key, *([tls.ca] if tls.ca else [])):
            if not f.is_file():
                raise InvalidInputError(f"TLS file {f} does not exist")
    if not 1 <= control_replicas <= MAX_CONTROL_REPLICAS:
        raise InvalidInputError(
            f"--control-replicas {control_replicas} is not in 1..{MAX_CONTROL_REPLICAS}"
        )
    controls = [control_credentials(workdir, replica=r) for r in range(1, control_replicas + 1)]
    enrollments = load_enrollments(workdir)
    hashes = {d: e.password_hash for d, e in enrollments.items()}
    grants = {d: broker_auth.device_grants(d) for d in enrollments}
    for control in controls:
        hashes[control.username] = broker_auth.hash_password(control.password)
        grants[control.username] = broker_auth.control_grants()
    files = BrokerFiles(out / "mosquitto.conf", out / "passwd", out / "acl", out / "data")
    files.persistence_dir.mkdir(parents=True, exist_ok=True)
    write_private(files.password_file, broker_auth.render_password_file(hashes).encode())
    write_private(files.acl_file, broker_auth.render_acl(grants).encode())
    conf = broker_auth.render_mosquitto_conf(
        port=port,
        host=host,
        password_file=files.password_file,
        acl_file=files.acl_file,
        persistence_dir=files.persistence_dir,
        tls=tls,
        run_as=run_as,
    )
    write_private(files.conf, conf.encode())
    return files
