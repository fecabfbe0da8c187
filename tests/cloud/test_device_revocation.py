"""A revoked device's tokens stop working: on the control plane at once, on the cloud
fallback at its next refresh, through a signed, versioned revocation list."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from cloud.enrollment import AgentSettings, enroll_device, load_revocations, revoke_device
from cloud.fallback import FallbackSettings, build_fallback_app
from common.device_token import DeviceClaims, issue_token, verify_token
from common.errors import InvalidInputError, VerificationError
from common.revocations import (
    RevocationHolder,
    Revocations,
    sign_revocations,
    verify_revocations,
)
from common.signing import Signer, TrustStore
from tests.edge.agent_harness import ControlPlane
from tests.model_fixtures import make_package, v2_infer_body


def test_a_token_issued_before_the_revocation_is_refused_one_after_is_not() -> None:
    signer = Signer.generate()
    trust = TrustStore([signer.public_key_hex])
    old = verify_token(trust, issue_token(signer, "dev-1", now=1000.0), now=1001.0)
    assert old.issued_at == 1000.0
    revoked = Revocations().with_device("dev-1", 2000.0)
    assert revoked.version == 1
    assert revoked.refuses(old)
    assert revoked.refuses(DeviceClaims("dev-1", math.inf))  # a token without issued_at
    assert not revoked.refuses(DeviceClaims("dev-1", math.inf, issued_at=2000.5))  # re-enrolled
    assert not revoked.refuses(DeviceClaims("dev-2", math.inf))


def test_the_list_is_signed_versioned_and_checked() -> None:
    signer, stranger = Signer.generate(), Signer.generate()
    trust = TrustStore([signer.public_key_hex])
    one = Revocations().with_device("dev-1", 10.0)
    two = one.with_device("dev-2", 20.0)
    holder = RevocationHolder(trust)
    assert holder.offer(sign_revocations(signer, two))
    assert not holder.offer(sign_revocations(signer, two))  # nothing new
    # A man in the middle cannot take a device off the list ...
    tampered = sign_revocations(signer, two)
    del tampered["revocations"]["revoked"]["dev-1"]
    with pytest.raises(VerificationError):
        holder.offer(tampered)
    # ... nor sign one of his own, nor replay an older one, nor send none at all.
    with pytest.raises(VerificationError):
        holder.offer(sign_revocations(stranger, Revocations(9, {})))
    with pytest.raises(VerificationError, match="older"):
        holder.offer(sign_revocations(signer, one))
    with pytest.raises(VerificationError, match="not signed"):
        holder.offer({"revocations": Revocations(9, {}).to_doc()})
    assert holder.current == two
    # Malformed lists are refused before anything is adopted.
    for doc in (
        {"version": 1, "revoked": {"../x": 1.0}},
        {"version": 1, "revoked": {"dev-1": math.nan}},
        {"version": 1, "revoked": {"dev-1": "yesterday"}},
        {"version": True, "revoked": {}},
        {"version": -1, "revoked": {}},
        {"version": 1, "revoked": []},
        [],
    ):
        with pytest.raises(InvalidInputError):
            Revocations.from_doc(doc)
    # Signed but malformed: still refused.
    doc = {"version": 3, "revoked": {"../x": 1.0}}
    signed = {"revocations": doc, "key_id": signer.key_id, "signature": signer.sign(doc)}
    with pytest.raises(InvalidInputError):
        holder.offer(signed)
    assert holder.current == two


async def _infer(client: TestClient, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    resp = await client.post("/v2/models/toy/infer", json=v2_infer_body(1), headers=headers)
    return resp.status


async def _artifact(cp: ControlPlane, digest: str, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as s,
        s.get(f"{cp.url}/api/artifacts/{digest}") as resp,
    ):
        return resp.status


async def test_revoking_a_device_closes_the_fallback_and_the_control_plane_to_it(
    mosquitto, tmp_path
) -> None:
    workdir = tmp_path / "control"
    async with ControlPlane(workdir, mosquitto) as cp:
        record = cp.publish_toy(tmp_path, "1")
        cloud = make_package(tmp_path / "cloud", variant="cloud", signer=cp.signer)
        tokens = {d: enroll_device(workdir, d, AgentSettings())["cloud_token"] for d in "ab"}
        settings = FallbackSettings(
            packages=[cloud.directory],
            trusted_keys=[cp.signer.public_key_hex],
            control_url=cp.url,
            control_token=cp.tokens["viewer"],
            device_tokens=True,
            key_refresh_s=0.1,
        )
        async with TestClient(TestServer(await build_fallback_app(settings))) as fallback:
            for token in tokens.values():
                assert await _infer(fallback, token) == 200
                assert await _artifact(cp, record.artifact_digest, token) == 200
            await asyncio.to_thread(revoke_device, workdir, "a")
            assert load_revocations(workdir).revoked.keys() == {"a"}
            # The control plane refuses it at once; the fallback after its next refresh.
            assert await _artifact(cp, record.artifact_digest, tokens["a"]) == 401
            async with asyncio.timeout(10):
                while await _infer(fallback, tokens["a"]) == 200:
                    await asyncio.sleep(0.05)
            resp = await fallback.post(
                "/v2/models/toy/infer",
                json=v2_infer_body(1),
                headers={"Authorization": f"Bearer {tokens['a']}"},
            )
            assert resp.status == 401 and "revoked" in await resp.text()
            assert await _infer(fallback, tokens["b"]) == 200  # the others keep working
            # Enrolled again (a repaired device), it gets a token that works again.
            await asyncio.sleep(0.01)
            fresh = enroll_device(workdir, "a", AgentSettings())["cloud_token"]
            assert await _artifact(cp, record.artifact_digest, fresh) == 200
            assert await _infer(fallback, fresh) == 200
            assert await _infer(fallback, tokens["a"]) == 401
            # What it serves is signed by the active key, after a rotation too.
            async with (
                aiohttp.ClientSession(headers=cp.auth("viewer")) as s,
                s.get(f"{cp.url}/api/device-revocations") as resp,
            ):
                signed = await resp.json()
            assert verify_revocations(cp.keys.trust, signed).revoked.keys() == {"a"}
