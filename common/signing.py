"""Ed25519 signatures over canonical JSON.

Canonical JSON: sorted keys, no whitespace, UTF-8. The signer and every
verifier must produce the same bytes, so nothing else may serialise a
document before signing it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import VerificationError
from common.fsutil import write_private


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public_key_hex: str) -> str:
    """A short, stable name for a public key (first 16 hex of its SHA-256)."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:16]


class Signer:
    """Holds the control plane's private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key_hex = raw.hex()
        self.key_id = key_id(self.public_key_hex)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """Load a PEM key, or create one (mode 0600 from the first byte) if there is none."""
        if path.exists():
            return cls.from_pem(path.read_bytes(), str(path))
        signer = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, signer.to_pem())
        return signer

    @classmethod
    def from_pem(cls, pem: bytes, where: str = "key") -> Signer:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise VerificationError(f"{where} is not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise VerificationError(f"{where} is not an Ed25519 private key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, doc: Any) -> str:
        """Hex signature of the canonical JSON of ``doc``."""
        return self._key.sign(canonical_json(doc)).hex()


# Roles a key may hold. A control key signs commands, keyrings, device tokens and
# manifests; a release key (kept offline by an operator) signs manifests only.
ROLES = ("control", "release")

# What a signature is checked for; each purpose accepts a different set of keys.
#   command:   commands and keyrings: trusted control keys only
#   token:     device tokens: control keys, retired ones too (tokens outlive a rotation)
#   manifest:  a package about to be deployed: trusted control or release keys
#   release:   an upload that claims an offline signature: trusted release keys only
#   installed: re-checking a package this host accepted earlier: also retired keys
# A revoked key verifies nothing, whatever the purpose.
Purpose = Literal["command", "token", "manifest", "release", "installed"]
_ROLES_FOR: dict[str, tuple[str, ...]] = {
    "command": ("control",),
    "token": ("control",),
    "manifest": ("control", "release"),
    "release": ("release",),
    "installed": ROLES,
}
_RETIRED_OK = ("token", "installed")


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public_key: str  # hex Ed25519
    role: str = "control"

    def to_dict(self) -> dict[str, str]:
        return {"key_id": self.key_id, "public_key": self.public_key, "role": self.role}


def _public(key: TrustedKey) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(key.public_key))
    except ValueError as exc:
        raise VerificationError(f"bad public key {key.public_key[:16]}...: {exc}") from exc


class TrustStore:
    """The keys this host trusts, with their roles, plus the retired and revoked ones.

    Built from the enrollment-time anchors (``public_keys_hex``, control keys,
    version 0) and then moved forward only by signed keyrings
    (``common.keyring.apply_chain``), whose ``version`` it remembers.
    """

    def __init__(self, public_keys_hex: list[str], *, role: str = "control") -> None:
        self.version = 0
        self._keys: dict[str, tuple[TrustedKey, Ed25519PublicKey]] = {}
        self._retired: dict[str, tuple[TrustedKey, Ed25519PublicKey]] = {}
        self.revoked: frozenset[str] = frozenset()
        for hx in public_keys_hex:
            if not isinstance(hx, str):
                raise VerificationError(f"bad trusted public key: {type(hx).__name__}")
            key = TrustedKey(_key_id_or_error(hx), hx, role)
            self._keys[key.key_id] = (key, _public(key))

    @classmethod
    def from_state(
        cls,
        keys: list[TrustedKey],
        retired: list[TrustedKey],
        revoked: frozenset[str],
        version: int,
    ) -> TrustStore:
        store = cls([])
        store._keys = {k.key_id: (k, _public(k)) for k in keys if k.key_id not in revoked}
        store._retired = {k.key_id: (k, _public(k)) for k in retired if k.key_id not in revoked}
        store.revoked = revoked
        store.version = version
        return store

    @property
    def keys(self) -> list[TrustedKey]:
        return [k for k, _ in self._keys.values()]

    @property
    def retired(self) -> list[TrustedKey]:
        return [k for k, _ in self._retired.values()]

    def adopt(self, other: TrustStore) -> None:
        """Take ``other``'s state in place: every part holding this store sees the change."""
        self._keys, self._retired = dict(other._keys), dict(other._retired)
        self.revoked, self.version = other.revoked, other.version

    def _lookup(self, signer_key_id: str, purpose: Purpose) -> Ed25519PublicKey:
        if signer_key_id in self.revoked:
            raise VerificationError(f"signed by revoked key {signer_key_id!r}")
        found = self._keys.get(signer_key_id)
        if found is None and purpose in _RETIRED_OK:
            found = self._retired.get(signer_key_id)
        if found is None:
            raise VerificationError(f"signed by untrusted key {str(signer_key_id)[:40]!r}")
        key, public = found
        if key.role not in _ROLES_FOR[purpose]:
            raise VerificationError(
                f"key {signer_key_id!r} is a {key.role} key; it may not sign a {purpose}"
            )
        return public

    def verify(
        self, doc: Any, signature_hex: str, signer_key_id: str, *, purpose: Purpose = "command"
    ) -> None:
        public = self._lookup(signer_key_id, purpose)
        try:
            public.verify(bytes.fromhex(signature_hex), canonical_json(doc))
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise VerificationError("bad signature") from exc


def _key_id_or_error(public_key_hex: str) -> str:
    try:
        return key_id(public_key_hex)
    except ValueError as exc:
        raise VerificationError(f"bad trusted public key {public_key_hex[:16]}...: {exc}") from exc
