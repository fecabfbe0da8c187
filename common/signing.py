"""Ed25519 signatures over canonical JSON.

Canonical JSON: sorted keys, no whitespace, UTF-8. The signer and every
verifier must produce the same bytes, so nothing else may serialise a
document before signing it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import VerificationError


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
        """Load a PEM key, or create one (mode 0600) if the file does not exist."""
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise VerificationError(f"{path} is not an Ed25519 private key")
            return cls(key)
        signer = cls.generate()
        pem = signer._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pem)
        tmp.chmod(0o600)
        tmp.replace(path)
        return signer

    def sign(self, doc: Any) -> str:
        """Hex signature of the canonical JSON of ``doc``."""
        return self._key.sign(canonical_json(doc)).hex()


class TrustStore:
    """The public keys a device was enrolled with; verifies signed documents."""

    def __init__(self, public_keys_hex: list[str]) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for hx in public_keys_hex:
            try:
                self._keys[key_id(hx)] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(hx))
            except ValueError as exc:
                raise VerificationError(f"bad trusted public key {hx[:16]}...: {exc}") from exc

    def verify(self, doc: Any, signature_hex: str, signer_key_id: str) -> None:
        key = self._keys.get(signer_key_id)
        if key is None:
            raise VerificationError(f"signed by untrusted key {signer_key_id!r}")
        try:
            key.verify(bytes.fromhex(signature_hex), canonical_json(doc))
        except (InvalidSignature, ValueError) as exc:
            raise VerificationError("bad signature") from exc
