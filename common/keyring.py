"""Signed keyrings: how a fleet learns new keys and forgets retired and revoked ones.

A keyring lists the keys a receiver (agent, fallback) trusts, with their roles,
the retired keys (no longer sign anything new; a package installed earlier
still re-verifies) and the revoked key ids (verify nothing, ever again). It is
signed by a control key the receiver already trusts and carries a version:

- a keyring signed by an untrusted, retired or revoked key is refused;
- a version not above the receiver's is refused (no rollback of trust);
- a keyring that would un-revoke a key is refused (revocation is for good).

Rotation is two keyrings: {old, new} signed by the old key (the fleet learns
the new key from one it trusts), then {new; retired old} signed by the new one.
The control plane sends the whole history (a chain) in a ``trust`` command, so
a receiver that missed a step catches up; the command itself may be signed by
any key the chain makes trusted, and nothing is committed unless both check.

Pure functions: they take a TrustStore and return a new one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidInputError, ReplayError, VerificationError
from common.json_object import parse_json_object
from common.messages import TRUST, Command, parse_command, sign_command
from common.signing import ROLES, Signer, TrustedKey, TrustStore, key_id

SCHEMA = "fogline.keyring/v1"
MAX_KEYS = 64  # per list (keys, retired, revoked)
MAX_CHAIN = 1024  # keyrings in one trust command: rotations in a fleet's life


@dataclass(frozen=True)
class Keyring:
    version: int
    keys: tuple[TrustedKey, ...]
    retired: tuple[TrustedKey, ...] = ()
    revoked: tuple[str, ...] = ()
    issued_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": self.version,
            "keys": [k.to_dict() for k in self.keys],
            "retired": [k.to_dict() for k in self.retired],
            "revoked": sorted(self.revoked),
            "issued_at": self.issued_at,
        }

    @classmethod
    def from_dict(cls, doc: Any) -> Keyring:
        """A validated keyring; InvalidInputError saying what is wrong otherwise."""
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise InvalidInputError(f"not a keyring (schema must be {SCHEMA!r})")
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidInputError(f"keyring version must be a positive integer: {version!r}")
        keys = _key_list(doc.get("keys"), "keys")
        retired = _key_list(doc.get("retired", []), "retired")
        revoked = doc.get("revoked", [])
        if not isinstance(revoked, list) or len(revoked) > MAX_KEYS:
            raise InvalidInputError("keyring 'revoked' must be a list of key ids")
        if not all(isinstance(r, str) and 0 < len(r) <= 64 for r in revoked):
            raise InvalidInputError("keyring 'revoked' must be a list of key ids")
        issued_at = doc.get("issued_at", 0.0)
        if not isinstance(issued_at, int | float) or isinstance(issued_at, bool):
            raise InvalidInputError("keyring 'issued_at' must be a number")
        ring = cls(version, tuple(keys), tuple(retired), tuple(revoked), float(issued_at))
        ring.validate()
        return ring

    def validate(self) -> None:
        # NOTE: the same bounds as from_dict: a keyring written past them could not be read
        # back by any receiver, nor by the control plane itself.
        for what, items in (
            ("keys", self.keys),
            ("retired", self.retired),
            ("revoked", self.revoked),
        ):
            if len(items) > MAX_KEYS:
                raise InvalidInputError(
                    f"keyring {what!r} would hold {len(items)} keys; at most {MAX_KEYS}: "
                    "revoke keys nothing installed still needs before changing more"
                )
        ids = [k.key_id for k in (*self.keys, *self.retired)]
        if len(set(ids)) != len(ids):
            raise InvalidInputError("keyring lists a key twice")
        if set(ids) & set(self.revoked):
            raise InvalidInputError("keyring trusts or retires a key it revokes")
        if not any(k.role == "control" for k in self.keys):
            raise InvalidInputError("keyring must trust at least one control key")

    def trust_store(self) -> TrustStore:
        return TrustStore.from_state(
            list(self.keys), list(self.retired), frozenset(self.revoked), self.version
        )


def _key_list(value: Any, what: str) -> list[TrustedKey]:
    if not isinstance(value, list) or len(value) > MAX_KEYS:
        raise InvalidInputError(f"keyring {what!r} must be a list of at most {MAX_KEYS} keys")
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"key_id", "public_key", "role"}:
            raise InvalidInputError(f"keyring {what!r}: each key has key_id, public_key, role")
        public, kid, role = item["public_key"], item["key_id"], item["role"]
        if not isinstance(public, str) or len(public) != 64 or role not in ROLES:
            raise InvalidInputError(f"keyring {what!r}: bad key {str(kid)[:20]!r}")
        try:
            derived = key_id(public)
        except ValueError as exc:
            raise InvalidInputError(f"keyring {what!r}: public key is not hex") from exc
        if derived != kid:
            raise InvalidInputError(f"keyring {what!r}: key_id {str(kid)[:20]!r} != its public key")
        out.append(TrustedKey(kid, public, role))
    return out


def sign_keyring(keyring: Keyring, signer: Signer) -> dict[str, Any]:
    doc = keyring.to_dict()
    return {"keyring": doc, "signature": signer.sign(doc), "key_id": signer.key_id}


def version_of(signed: Any) -> int:
    """The version a signed keyring claims (unverified: for ordering and skipping only)."""
    try:
        version = signed["keyring"]["version"]
    except (KeyError, TypeError):
        raise InvalidInputError("malformed signed keyring: needs keyring.version") from None
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidInputError("malformed signed keyring: version is not an integer")
    return version


def apply_keyring(trust: TrustStore, signed: Any) -> TrustStore:
    """The trust after ``signed`` (a signed keyring), or VerificationError / ReplayError."""
    if not isinstance(signed, dict) or not {"keyring", "signature", "key_id"} <= set(signed):
        raise InvalidInputError("malformed signed keyring: needs keyring, signature, key_id")
    signature, signer = signed["signature"], signed["key_id"]
    if not isinstance(signature, str) or not isinstance(signer, str):
        raise InvalidInputError("malformed signed keyring: signature and key_id are strings")
    ring = Keyring.from_dict(signed["keyring"])
    trust.verify(signed["keyring"], signature, signer, purpose="command")
    if ring.version <= trust.version:
        raise ReplayError(f"keyring version {ring.version} is not newer than {trust.version}")
    undone = trust.revoked - set(ring.revoked)
    if undone:
        raise VerificationError(f"keyring {ring.version} would un-revoke {sorted(undone)}")
    return ring.trust_store()


def apply_chain(
    trust: TrustStore, chain: Any, *, require_newer: bool = True
) -> tuple[TrustStore, list[dict[str, Any]]]:
    """Apply the keyrings of ``chain`` newer than ``trust``, in version order.

    Returns the new trust and the keyrings applied. A step this receiver cannot
    verify is skipped (it changes nothing), but the newest keyring must end up
    applied, or the whole chain is refused. With ``require_newer``, a chain with
    nothing newer is a ReplayError.
    """
    if not isinstance(chain, list) or not chain or len(chain) > MAX_CHAIN:
        raise InvalidInputError(f"keyrings must be a list of 1-{MAX_CHAIN} signed keyrings")
    newer = sorted((d for d in chain if version_of(d) > trust.version), key=version_of)
    if not newer:
        if require_newer:
            top = max(version_of(d) for d in chain)
            raise ReplayError(f"keyring version {top} is not newer than {trust.version}")
        return trust, []
    current, applied = trust, []
    error: VerificationError | None = None
    for doc in newer:
        if version_of(doc) <= current.version:
            continue
        try:
            current = apply_keyring(current, doc)
        except VerificationError as exc:
            error = exc
            continue
        applied.append(doc)
    if current.version != version_of(newer[-1]):
        raise error or VerificationError("the newest keyring could not be verified")
    return current, applied


def trust_command(
    device_id: str, chain: list[dict[str, Any]], signer: Signer, ttl_s: float = 3600.0
) -> bytes:
    """A signed ``trust`` command carrying the keyring history.

    Its ``seq`` is 0: keyring versions, not the device's command sequence, order
    trust changes, so a trust push never races a deploy for a sequence number.
    """
    cmd = Command(TRUST, device_id, 0, time.time() + ttl_s, {"keyrings": chain})
    return sign_command(cmd, signer)


def verify_trust_command(
    payload: bytes, trust: TrustStore, device_id: str
) -> tuple[Command, TrustStore, list[dict[str, Any]]]:
    """Check a ``trust`` command: its keyrings against ``trust``, then the command itself
    against the trust they lead to. Returns (command, new trust, keyrings applied);
    ``trust`` is not changed, so a refused command leaves nothing behind."""
    doc = parse_json_object(payload, "command")
    try:
        chain = doc["command"]["body"]["keyrings"]
    except (KeyError, TypeError):
        raise InvalidInputError("trust command without body.keyrings") from None
    candidate, applied = apply_chain(trust, chain)
    cmd = parse_command(payload, candidate, device_id)
    if cmd.type != TRUST:
        raise InvalidInputError(f"expected a trust command, got {cmd.type!r}")
    return cmd, candidate, applied
