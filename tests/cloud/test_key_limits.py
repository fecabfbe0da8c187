"""A keyring at its limits: the control plane never writes one that nobody can read.

Red team: a keyring lists at most 64 keys per list (``common.keyring.MAX_KEYS``),
checked when it is read but not when the control plane writes it. The 65th
rotate + retire wrote a keyring that every agent and fallback refused, and that
the control plane itself could no longer read (``KeyStore.current`` raised), so
it would not start again.
"""

from __future__ import annotations

import pytest

from cloud.keys import KeyStore
from common.errors import InvalidInputError
from common.keyring import MAX_KEYS, apply_chain
from common.signing import TrustStore


def test_the_retired_list_is_full_is_a_clear_error_not_a_broken_keyring(tmp_path) -> None:
    store = KeyStore(tmp_path)
    anchor = TrustStore([store.open_or_create().public_key_hex])
    for _ in range(MAX_KEYS):
        old, _new = store.rotate()
        store.retire(old.key_id)
    version = store.current().version
    old, _new = store.rotate()
    with pytest.raises(InvalidInputError, match="64"):
        store.retire(old.key_id)
    assert store.current().version == version + 1  # still readable: the rotation stands
    trust, _ = apply_chain(anchor, store.history())  # and a receiver still follows it
    assert trust.version == version + 1


def test_too_many_trusted_keys_is_a_clear_error(tmp_path) -> None:
    store = KeyStore(tmp_path)
    store.open_or_create()
    with pytest.raises(InvalidInputError, match="64"):
        for _ in range(MAX_KEYS + 1):
            store.rotate()
    assert len(store.current().keys) == MAX_KEYS
