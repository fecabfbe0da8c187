"""Device tokens: signed by the control plane, verified offline, each device its own."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.device_token import issue_token, verify_token
from common.errors import AuthError
from common.signing import Signer, TrustStore

SIGNER = Signer.generate()
TRUST = TrustStore([SIGNER.public_key_hex])


@given(device=st.text(min_size=1, max_size=40))
def test_round_trip(device: str) -> None:
    claims = verify_token(TRUST, issue_token(SIGNER, device))
    assert claims.device_id == device


def test_expired_forged_and_foreign_tokens_are_refused() -> None:
    with pytest.raises(AuthError, match="expired"):
        verify_token(TRUST, issue_token(SIGNER, "d1", lifetime_s=10, now=1000.0), now=2000.0)
    token = issue_token(SIGNER, "d1")
    payload, _, sig = token.partition(".")
    other = issue_token(SIGNER, "d2").partition(".")[0]
    with pytest.raises(AuthError, match="invalid"):
        verify_token(TRUST, f"{other}.{sig}")  # d1's signature on d2's claims
    with pytest.raises(AuthError, match="invalid"):
        verify_token(TRUST, issue_token(Signer.generate(), "d1"))  # untrusted key
    for garbage in ("", ".", "abc", "abc.def", f"{payload}.", "!!!.zz"):
        with pytest.raises(AuthError):
            verify_token(TRUST, garbage)
