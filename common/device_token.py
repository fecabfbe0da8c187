"""Device tokens: what an enrolled device presents to the cloud fallback.

A token is ``<payload>.<signature>``: base64url of canonical JSON
``{"device_id", "issued_at", "expires_at", "key_id"}`` and an Ed25519 signature
of it by the control plane's key. The fallback verifies it offline with the
public keys it trusts, so it needs no database of tokens, and each device has
its own; a revoked device's tokens are refused through the signed revocation
list (``common.revocations``), which compares ``issued_at`` with the revocation.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any

from common.errors import AuthError, VerificationError
from common.json_object import load_json
from common.signing import Signer, TrustStore, canonical_json

DEFAULT_LIFETIME_S = 30 * 24 * 3600.0


@dataclass(frozen=True)
class DeviceClaims:
    device_id: str
    expires_at: float
    issued_at: float = 0.0  # 0: a token from before tokens carried it (older than any revocation)


def issue_token(
    signer: Signer,
    device_id: str,
    *,
    lifetime_s: float = DEFAULT_LIFETIME_S,
    now: float | None = None,
) -> str:
    issued_at = time.time() if now is None else now
    claims = {
        "device_id": device_id,
        "issued_at": round(issued_at, 3),
        "expires_at": round(issued_at + lifetime_s, 3),
        "key_id": signer.key_id,
    }
    payload = base64.urlsafe_b64encode(canonical_json(claims)).decode().rstrip("=")
    return f"{payload}.{signer.sign(claims)}"


def verify_token(trust: TrustStore, token: str, *, now: float | None = None) -> DeviceClaims:
    """The claims of a valid, unexpired token; AuthError for anything else."""
    try:
        payload, _, signature = token.partition(".")
        # load_json: bounded depth (a bare RecursionError would be a 500), no NaN.
        claims: Any = load_json(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        trust.verify(claims, signature, str(claims["key_id"]), purpose="token")
        device_id, expires_at = str(claims["device_id"]), float(claims["expires_at"])
        issued_at = float(claims.get("issued_at", 0.0))
    except (ValueError, KeyError, TypeError, binascii.Error, VerificationError) as exc:
        raise AuthError(f"invalid device token: {exc}") from None
    if expires_at < (time.time() if now is None else now):
        raise AuthError(f"device token for {device_id!r} expired")
    return DeviceClaims(device_id, expires_at, issued_at)
