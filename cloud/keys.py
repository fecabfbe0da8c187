"""The control plane's keys on disk, outside every directory a route serves.

``WORKDIR/keys/`` (mode 0700) holds:

- ``signing.pem``: the one control private key in use (0600). A rotation replaces
  it; the old private key is not kept, so there is at most one on disk.
- ``keyring.json``: the history of signed keyrings (``common.keyring``), newest
  last (0600). Agents and the fallback are sent the whole history, so one that
  missed a step still catches up.
- ``.lock``: held (flock) by a running control plane. Offline changes with the
  CLI take it too, so the CLI and a running server never both change the keys;
  while the server runs, change them through its admin routes instead.

Release keys (``fogline keys create --release``) never come here: only their
public half is added to the keyring.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from common.errors import AlreadyExistsError, FoglineError, InvalidInputError
from common.fsutil import write_private
from common.keyring import Keyring, sign_keyring
from common.signing import ROLES, Signer, TrustedKey, TrustStore, key_id

KEYS_DIR = "keys"
SIGNING_FILE = "signing.pem"
KEYRING_FILE = "keyring.json"
LOCK_FILE = ".lock"


class KeyStoreBusyError(FoglineError, BlockingIOError):
    """The keys are held by a running control plane (or another CLI)."""

    http_status = 409


def _control(signer: Signer) -> TrustedKey:
    return TrustedKey(signer.key_id, signer.public_key_hex, "control")


class KeyStore:
    """One control plane's key directory. Methods are blocking (disk): run them off the loop."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / KEYS_DIR
        self.signing_path = self.dir / SIGNING_FILE
        self.keyring_path = self.dir / KEYRING_FILE

    def exists(self) -> bool:
        return self.signing_path.is_file()

    def _mkdir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    # -- locking -------------------------------------------------------------------

    def hold(self) -> IO[bytes]:
        """Take the lock for the life of the returned file (a running control plane)."""
        self._mkdir()
        lock = (self.dir / LOCK_FILE).open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise KeyStoreBusyError(
                f"{self.dir} is in use by a running control plane: change keys through it "
                "(--control URL) or stop it first"
            ) from None
        return lock

    @contextmanager
    def locked(self) -> Iterator[None]:
        lock = self.hold()
        try:
            yield
        finally:
            lock.close()

    # -- reading -------------------------------------------------------------------

    def signer(self) -> Signer:
        try:
            pem = self.signing_path.read_bytes()
        except FileNotFoundError:
            raise InvalidInputError(
                f"no signing key in {self.dir}: create one with `fogline keys create`"
            ) from None
        return Signer.from_pem(pem, str(self.signing_path))

    def history(self) -> list[dict[str, Any]]:
        try:
            history = json.loads(self.keyring_path.read_text())["keyrings"]
        except FileNotFoundError:
            raise InvalidInputError(f"no keyring in {self.dir}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{self.keyring_path} is corrupt: {exc}") from exc
        if not isinstance(history, list) or not history:
            raise InvalidInputError(f"{self.keyring_path} holds no keyrings")
        return history

    def current(self) -> Keyring:
        return Keyring.from_dict(self.history()[-1]["keyring"])

    def trust(self) -> TrustStore:
        """What this control plane itself trusts (it wrote the keyrings: no chain to check)."""
        return self.current().trust_store()

    def listing(self) -> list[dict[str, str]]:
        """Every key the keyrings ever named: id, role, state (active|trusted|retired|revoked)."""
        ring, active = self.current(), self.signer().key_id
        seen: dict[str, TrustedKey] = {}
        for doc in self.history():
            for k in Keyring.from_dict(doc["keyring"]).keys:
                seen[k.key_id] = k
        rows = [(k, "active" if k.key_id == active else "trusted") for k in ring.keys]
        rows += [(k, "retired") for k in ring.retired]
        rows += [(seen[r], "revoked") for r in ring.revoked if r in seen]
        rows.sort(key=lambda r: ("active", "trusted", "retired", "revoked").index(r[1]))
        return [{**k.to_dict(), "state": state} for k, state in rows]

    # -- changing ------------------------------------------------------------------

    def create(self) -> Signer:
        """The first control key, and keyring 1 naming it (signed by itself)."""
        if self.exists():
            raise AlreadyExistsError(f"{self.signing_path} exists; use `fogline keys rotate`")
        if self.keyring_path.exists():
            # A new first key would restart the keyring at version 1: no device takes it.
            raise InvalidInputError(
                f"{self.keyring_path} exists but {self.signing_path} does not: "
                "restore the key from a backup"
            )
        self._mkdir()
        signer = Signer.generate()
        write_private(self.signing_path, signer.to_pem())
        self._write_history([sign_keyring(Keyring(1, (_control(signer),)), signer)])
        return signer

    def open_or_create(self) -> Signer:
        """For a starting control plane: the active key, created on first start.

        A workdir from before keyrings (``signing.pem`` only) gets keyring 1 for its key.
        """
        if not self.exists():
            return self.create()
        self._mkdir()
        signer = self.signer()
        if not self.keyring_path.exists():
            self._write_history([sign_keyring(Keyring(1, (_control(signer),)), signer)])
        return signer

    def _append(self, ring: Keyring, signer: Signer) -> None:
        ring.validate()
        self._write_history([*self.history(), sign_keyring(ring, signer)])

    def _write_history(self, history: list[dict[str, Any]]) -> None:
        write_private(self.keyring_path, json.dumps({"keyrings": history}, indent=1).encode())

    def rotate(self) -> tuple[Signer, Signer]:
        """A new active key. The keyring that adds it is signed by the old key, which
        stays trusted until ``retire``. Returns (old, new)."""
        old, new, ring = self.signer(), Signer.generate(), self.current()
        staged = self.dir / (SIGNING_FILE + ".next")
        write_private(staged, new.to_pem())  # a crash before the rename leaves the old key
        self._append(replace(ring, version=ring.version + 1, keys=(*ring.keys, _control(new))), old)
        os.replace(staged, self.signing_path)
        return old, new

    def _find(self, ring: Keyring, kid: str) -> TrustedKey:
        if kid == self.signer().key_id:
            raise InvalidInputError(f"{kid} is the active signing key: rotate first")
        for k in (*ring.keys, *ring.retired):
            if k.key_id == kid:
                return k
        if kid in ring.revoked:
            raise InvalidInputError(f"key {kid} is already revoked")
        raise InvalidInputError(f"no key {kid!r} in the keyring (see `fogline keys list`)")

    def retire(self, kid: str) -> Keyring:
        """Stop trusting ``kid`` for anything new (installed packages still load)."""
        ring = self.current()
        key = self._find(ring, kid)
        if key in ring.retired:
            raise InvalidInputError(f"key {kid} is already retired")
        keys = tuple(k for k in ring.keys if k.key_id != kid)
        new = replace(ring, version=ring.version + 1, keys=keys, retired=(*ring.retired, key))
        self._append(new, self.signer())
        return new

    def revoke(self, kid: str) -> Keyring:
        """Refuse everything ``kid`` ever signed, for good."""
        ring = self.current()
        self._find(ring, kid)
        new = replace(
            ring,
            version=ring.version + 1,
            keys=tuple(k for k in ring.keys if k.key_id != kid),
            retired=tuple(k for k in ring.retired if k.key_id != kid),
            revoked=(*ring.revoked, kid),
        )
        self._append(new, self.signer())
        return new

    def add(self, public_key_hex: str, role: str = "release") -> TrustedKey:
        """Trust a key made elsewhere (an offline release key)."""
        if role not in ROLES:
            raise InvalidInputError(f"role must be one of {ROLES}")
        try:
            TrustStore([public_key_hex])
            kid = key_id(public_key_hex)
        except (ValueError, FoglineError) as exc:
            raise InvalidInputError(f"not an Ed25519 public key (64 hex digits): {exc}") from exc
        if len(public_key_hex) != 64:
            raise InvalidInputError("an Ed25519 public key is 64 hex digits")
        ring = self.current()
        if kid in ring.revoked or any(k.key_id == kid for k in (*ring.keys, *ring.retired)):
            raise AlreadyExistsError(f"key {kid} is already in the keyring (or revoked)")
        key = TrustedKey(kid, public_key_hex.lower(), role)
        self._append(replace(ring, version=ring.version + 1, keys=(*ring.keys, key)), self.signer())
        return key


def trusted_public_keys(workdir: Path) -> list[str]:
    """Hex public keys of the control keys trusted now: the anchors an enrolled agent's
    config lists as ``trusted_keys`` (``fogline device enroll``)."""
    return [k.public_key for k in KeyStore(workdir).current().keys if k.role == "control"]


def enrollment_trust(workdir: Path) -> dict[str, Any]:
    """What enrollment writes into an agent config: the anchors and the current signed
    keyring (``trusted_keyring``), so a new device starts at the fleet's keyring version
    and never accepts an older one, and knows the release keys from the start."""
    store = KeyStore(workdir)
    return {"trusted_keys": trusted_public_keys(workdir), "trusted_keyring": store.history()[-1]}
