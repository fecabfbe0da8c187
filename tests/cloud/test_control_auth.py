"""Operator identity on a real control plane over loopback: every route, every role.

Each route is found in the app's own router, so a route added later without a
role in the table fails here.
"""

from __future__ import annotations

import re

import aiohttp
import pytest

from cloud.operator_tokens import ROLES, OperatorTokens, token_hash
from common.device_token import issue_token
from common.signing import Signer
from tests.edge.agent_harness import ControlPlane

PUBLIC = {
    (method, path) for method in ("GET", "HEAD") for path in ("/", "/api/health", "/static/{file}")
}
# The least role each route needs (HEAD as GET).
NEEDS = {
    ("GET", "/api/keys"): "viewer",
    ("POST", "/api/keys"): "admin",
    ("POST", "/api/keys/rotate"): "admin",
    ("POST", "/api/keys/{key_id}/retire"): "admin",
    ("POST", "/api/keys/{key_id}/revoke"): "admin",
    ("GET", "/api/whoami"): "viewer",
    ("GET", "/api/devices"): "viewer",
    ("POST", "/api/devices/{device_id}/token"): "admin",
    ("GET", "/api/device-revocations"): "viewer",
    ("GET", "/api/models"): "viewer",
    ("POST", "/api/models"): "operator",
    ("GET", "/api/models/{name}/versions/{version}"): "viewer",
    ("GET", "/api/models/{name}"): "viewer",
    ("GET", "/api/models/{name}/lineage"): "viewer",
    ("GET", "/api/artifacts/{digest}"): "viewer",
    ("POST", "/api/rollouts"): "operator",
    ("GET", "/api/rollouts"): "viewer",
    ("GET", "/api/rollouts/{id}"): "viewer",
    ("POST", "/api/rollouts/{id}/abort"): "operator",
    ("GET", "/api/events"): "viewer",
    ("POST", "/api/staged-rollouts"): "operator",
    ("GET", "/api/staged-rollouts"): "viewer",
    ("GET", "/api/staged-rollouts/{id}"): "viewer",
    ("POST", "/api/staged-rollouts/{id}/pause"): "operator",
    ("POST", "/api/staged-rollouts/{id}/resume"): "operator",
    ("POST", "/api/staged-rollouts/{id}/abort"): "operator",
    ("POST", "/api/staged-rollouts/{id}/rollback"): "operator",
    ("GET", "/api/audit"): "operator",
    ("GET", "/api/dashboard/fleet"): "viewer",
    ("GET", "/api/dashboard/serving"): "viewer",
    ("GET", "/api/hard-examples"): "viewer",
    ("POST", "/api/hard-examples/{name}"): "device",  # a device's own token, no operator's
    ("GET", "/api/hard-examples/{name}"): "viewer",
    ("GET", "/metrics"): "metrics",  # a scrape-only token: aggregates, no device ids
    ("POST", "/api/devices/{device_id}/policy"): "operator",
    ("POST", "/api/models/{name}/policy"): "operator",
    ("DELETE", "/api/devices/{device_id}/models/{name}"): "operator",
}


def _routes(cp: ControlPlane, digest: str) -> list[tuple[str, str, str]]:
    """(method, pattern, concrete URL path) for every route of the running app."""
    values = {
        "device_id": "dev-1",
        "name": "toy",
        "version": "1",
        "digest": digest,
        "id": "x1",
        "key_id": "0123456789abcdef",
        "file": "dashboard.js",
    }
    out = []
    for route in cp.app.router.routes():
        pattern = route.resource.canonical if route.resource else ""
        path = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], pattern)
        out.append((route.method, pattern, path))
    return out


async def _status(s: aiohttp.ClientSession, method: str, url: str, auth: str | None) -> int:
    """The status of a call with this ``Authorization`` header value (None: no header)."""
    headers = {"Authorization": auth} if auth is not None else {}
    async with s.request(method, url, headers=headers, data=b"{}") as resp:
        if resp.status in (401, 403) and method != "HEAD":
            assert "error" in await resp.json()  # one JSON error shape for every refusal
        return resp.status


async def test_every_route_but_health_needs_a_token_with_the_right_role(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        digest = cp.publish_toy(tmp_path, "1").artifact_digest
        routes = _routes(cp, digest)
        assert {(m if m != "HEAD" else "GET", p) for m, p, _ in routes} - PUBLIC == set(NEEDS)
        revoked = cp.registry.operators.create("gone", "admin")
        cp.registry.operators.revoke("gone")
        async with aiohttp.ClientSession() as s:
            for method, pattern, path in routes:
                url = cp.url + path
                if (method, pattern) in PUBLIC:
                    assert await _status(s, method, url, None) == 200, path
                    continue
                for bad in (
                    None,
                    "Bearer",
                    "Bearer fgo_not-a-token",
                    f"Bearer {revoked}",
                    f"Basic {cp.tokens['admin']}",  # the right token, the wrong scheme
                    "Bearer " + "x" * 4000,
                ):
                    assert await _status(s, method, url, bad) == 401, (method, path, bad)
                need = NEEDS[("GET" if method == "HEAD" else method, pattern)]
                for role in ROLES:
                    status = await _status(s, method, url, f"Bearer {cp.tokens[role]}")
                    allowed = need != "device" and ROLES.index(role) >= ROLES.index(need)
                    assert (status not in (401, 403)) == allowed, (method, path, role, status)
                    if not allowed:
                        assert status == 403


async def test_the_issue_attacks_without_a_token_are_refused(mosquitto, tmp_path) -> None:
    """No publish, no rollout, no device token minted without credentials."""
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{cp.url}/api/devices/cam-1/token") as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                assert "token" not in await resp.json()
            body = {"model": "toy", "version": "1", "devices": ["cam-1"]}
            async with s.post(f"{cp.url}/api/rollouts", json=body) as resp:
                assert resp.status == 401
            async with s.post(f"{cp.url}/api/rollouts", json=body, headers=cp.auth("viewer")) as r:
                assert r.status == 403 and "operator" in (await r.json())["error"]
            async with s.post(f"{cp.url}/api/models", data=b"x") as resp:
                assert resp.status == 401
        assert cp.registry.rollouts() == []


async def test_artifacts_open_to_a_device_token_signed_by_this_plane_only(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        record = cp.publish_toy(tmp_path, "1")
        url = f"{cp.url}/api/artifacts/{record.artifact_digest}"
        full = cp.registry.artifact_path(record.artifact_digest).read_bytes()
        async with aiohttp.ClientSession() as s:
            good = issue_token(cp.signer, "dev-1")
            async with s.get(url, headers={"Authorization": f"Bearer {good}"}) as resp:
                assert resp.status == 200 and await resp.read() == full
            for bad in (
                issue_token(Signer.generate(), "dev-1"),  # someone else's key
                issue_token(cp.signer, "dev-1", lifetime_s=-1),  # expired
                good[:-4] + "0000",  # tampered signature
            ):
                async with s.get(url, headers={"Authorization": f"Bearer {bad}"}) as resp:
                    assert resp.status == 401, bad
            # A device token opens artifacts, nothing else.
            for path in ("/api/devices", "/api/models", "/api/events"):
                headers = {"Authorization": f"Bearer {good}"}
                async with s.get(cp.url + path, headers=headers) as resp:
                    assert resp.status == 401, path


async def test_the_dashboard_page_is_public_but_its_data_needs_a_token(mosquitto, tmp_path):
    async with (
        ControlPlane(tmp_path / "control", mosquitto) as cp,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(f"{cp.url}/") as resp:
            page = await resp.text()
            assert resp.status == 200
        assert "#token=" in page
        async with s.get(f"{cp.url}/static/dashboard.js") as resp:
            assert "Authorization = `Bearer ${token}`" in await resp.text()
        # Static files come from a fixed table: a path in the name reaches nothing.
        hostile = ("..%2Fcontrol_server.py", "vendor%2Fuplot%2FLICENSE", "..%2Fkeys", "x" * 300)
        for bad in hostile:
            async with s.get(f"{cp.url}/static/{bad}") as resp:
                assert resp.status == 404, bad
        async with s.get(f"{cp.url}/api/devices", headers=cp.auth("viewer")) as resp:
            assert resp.status == 200


@pytest.fixture(params=["sqlite", "postgresql"])
def tokens(request, tmp_path):
    from cloud.database import Database

    target = (
        str(tmp_path / "t.sqlite")
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    db = Database(target)
    yield OperatorTokens(db), db
    db.close()


def test_tokens_are_stored_hashed_and_revocable(tokens) -> None:
    from common.errors import AlreadyExistsError, AuthError, InvalidInputError

    store, db = tokens
    token = store.create("alice", "operator")
    assert store.verify(token).role == "operator"
    dump = repr(db.execute("SELECT * FROM operator_tokens"))
    assert token not in dump and token_hash(token) in dump  # never the plaintext
    with pytest.raises(AlreadyExistsError):
        store.create("alice", "admin")
    with pytest.raises(InvalidInputError):
        store.create("../alice", "admin")
    with pytest.raises(InvalidInputError):
        store.create("bob", "root")
    store.revoke("alice")
    with pytest.raises(AuthError):
        store.verify(token)
    with pytest.raises(InvalidInputError):
        store.revoke("alice")  # already revoked
    again = store.create("alice", "viewer")  # a revoked name may be reused
    assert store.verify(again).role == "viewer"
    with pytest.raises(AuthError):
        store.verify(token)  # the old token stays dead
    assert store.list() == [
        {"name": "alice", "role": "viewer", "created_at": store.list()[0]["created_at"],
         "revoked": False}
    ]  # fmt: skip


async def test_tokens_made_on_the_host_work_against_a_plane_on_postgresql(
    mosquitto, tmp_path, postgres_url
) -> None:
    from cloud.token_cli import create_token, open_registry

    token = create_token(tmp_path / "control", "ops", "operator", database=postgres_url)
    async with (
        ControlPlane(tmp_path / "control", mosquitto, database=postgres_url) as cp,
        aiohttp.ClientSession() as s,
    ):
        headers = {"Authorization": f"Bearer {token}"}
        async with s.get(f"{cp.url}/api/models", headers=headers) as resp:
            assert resp.status == 200
        registry = open_registry(tmp_path / "control", database=postgres_url)
        registry.operators.revoke("ops")  # on the host, while the plane runs
        registry.close()
        async with s.get(f"{cp.url}/api/models", headers=headers) as resp:
            assert resp.status == 401
    assert not (tmp_path / "control" / "control.sqlite").exists()
