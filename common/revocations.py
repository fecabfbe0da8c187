"""Revoked devices: a signed, versioned list that every verifier of device tokens follows.

Device tokens are checked offline (``common.device_token``), so revoking a
device must reach each verifier as data: ``fogline device revoke`` appends the
device with the time of revocation and signs the whole list with the control
key; the control plane serves it (``GET /api/device-revocations``) and the cloud
fallback pulls it with its keyrings. A token is refused when its device is on
the list and it was issued at or before the revocation, so re-enrolling the
device later gives it a token that works again.

The signature (a control key, as for keyrings) and the version (never lower
than the one a verifier holds) keep a man in the middle from taking a device
off the list or replaying an older one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.device_token import DeviceClaims
from common.errors import InvalidInputError, VerificationError
from common.names import check_name
from common.signing import Signer, TrustStore

MAX_REVOKED = 100_000  # far past any fleet this serves; bounds what a verifier holds


@dataclass(frozen=True)
class Revocations:
    version: int = 0
    revoked: Mapping[str, float] = field(default_factory=dict)  # device id -> revoked at

    def refuses(self, claims: DeviceClaims) -> bool:
        at = self.revoked.get(claims.device_id)
        return at is not None and claims.issued_at <= at

    def with_device(self, device_id: str, at: float) -> Revocations:
        if len(self.revoked) >= MAX_REVOKED and device_id not in self.revoked:
            raise InvalidInputError(f"the revocation list is full ({MAX_REVOKED} devices)")
        revoked = {**self.revoked, check_name(device_id, "device id"): round(at, 3)}
        return Revocations(self.version + 1, revoked)

    def to_doc(self) -> dict[str, Any]:
        return {"version": self.version, "revoked": dict(sorted(self.revoked.items()))}

    @classmethod
    def from_doc(cls, doc: Any) -> Revocations:
        """The list a document holds; InvalidInputError for anything malformed."""
        if not isinstance(doc, dict) or not isinstance(doc.get("revoked"), dict):
            raise InvalidInputError("a revocation list is an object with a 'revoked' object")
        version, revoked = doc.get("version"), doc["revoked"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise InvalidInputError(f"revocation list version {version!r} is not a count")
        if len(revoked) > MAX_REVOKED:
            raise InvalidInputError(f"a revocation list holds at most {MAX_REVOKED} devices")
        out: dict[str, float] = {}
        for device_id, at in revoked.items():
            check_name(device_id, "device id")
            if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
                raise InvalidInputError(f"revocation time of {device_id!r} is not a number")
            out[device_id] = float(at)
        return cls(version, out)


def sign_revocations(signer: Signer, revocations: Revocations) -> dict[str, Any]:
    doc = revocations.to_doc()
    return {"revocations": doc, "key_id": signer.key_id, "signature": signer.sign(doc)}


def verify_revocations(trust: TrustStore, signed: Any) -> Revocations:
    """The list in ``signed`` if a trusted control key signed it; VerificationError if not,
    InvalidInputError if it is malformed."""
    if not isinstance(signed, dict):
        raise InvalidInputError("a signed revocation list is an object")
    doc, signature, key = signed.get("revocations"), signed.get("signature"), signed.get("key_id")
    if not isinstance(signature, str) or not isinstance(key, str):
        raise VerificationError("the revocation list is not signed")
    trust.verify(doc, signature, key, purpose="command")
    return Revocations.from_doc(doc)


class RevocationHolder:
    """The newest list a verifier has accepted: an older version never replaces it."""

    def __init__(self, trust: TrustStore) -> None:
        self._trust = trust
        self.current = Revocations()

    def offer(self, signed: Any) -> bool:
        """Adopt ``signed`` if it verifies and is not older; True if it changed anything."""
        new = verify_revocations(self._trust, signed)
        if new.version < self.current.version:
            raise VerificationError(
                f"revocation list version {new.version} is older than the "
                f"{self.current.version} held here"
            )
        changed = new != self.current
        self.current = new
        return changed

    def refuses(self, claims: DeviceClaims) -> bool:
        return self.current.refuses(claims)
