"""What the fallback loads, decided (a table) and done (a watched directory of packages)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cloud.fallback import FALLBACK_REPOSITORY, FallbackSettings, build_fallback_app
from cloud.fallback.repository import Candidate, plan_loads
from common.signing import Signer
from tests.model_fixtures import make_package, v2_infer_body


def c(version: str, release: int, name: str = "m", key: str = "k") -> Candidate:
    return Candidate(name, version, release, key)


@pytest.mark.parametrize(
    ("offered", "loaded", "failed", "skip", "keep", "want"),
    [
        # nothing loaded: the newest `keep`, newest first
        ([c("1", 1), c("2", 2), c("3", 3)], {}, set(), set(), 2, [c("3", 3), c("2", 2)]),
        # up to date
        ([c("1", 1), c("2", 2)], {"m": {"1", "2"}}, set(), set(), 2, []),
        # a new one
        ([c("1", 1), c("2", 2), c("3", 3)], {"m": {"1", "2"}}, set(), set(), 2, [c("3", 3)]),
        # the new one failed: nothing to do, 2 stays the latest
        ([c("2", 2), c("3", 3)], {"m": {"2"}}, {c("3", 3)}, set(), 1, []),
        # ... until its package changes (a new key)
        (
            [c("2", 2), c("3", 3, key="k2")],
            {"m": {"2"}},
            {c("3", 3)},
            set(),
            1,
            [c("3", 3, key="k2")],
        ),
        # releases, not names, say which is newest
        ([c("10", 1), c("9", 2)], {}, set(), set(), 1, [c("9", 2)]),
        # an operator unloaded it
        ([c("1", 1)], {}, set(), {"m"}, 1, []),
        # two models, each its own
        ([c("1", 1, "b"), c("1", 1, "a")], {}, set(), set(), 1, [c("1", 1, "a"), c("1", 1, "b")]),
        # one version offered twice (two directories): loaded once
        ([c("1", 1, key="x"), c("1", 1, key="y")], {}, set(), set(), 2, [c("1", 1, key="x")]),
    ],
)
def test_plan_loads(offered, loaded, failed, skip, keep, want) -> None:  # type: ignore[no-untyped-def]
    assert plan_loads(offered, loaded, failed, skip, keep) == want


async def served_version(client: TestClient) -> str:
    resp = await client.post("/v2/models/toy/infer", json=v2_infer_body(1))
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["model_version"])


async def until(check, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def test_models_dir_is_watched_and_verified(tmp_path: Path) -> None:
    signer = Signer.generate()
    root = tmp_path / "models"

    def package(version: str, **kw: object):  # type: ignore[no-untyped-def]
        kw = {"signer": signer, **kw}
        return make_package(
            root / f"toy-{version}", version=version, release=int(version), variant="cloud", **kw
        )

    package("1")
    make_package(root / "edge-9", version="9", release=9, signer=signer)  # not the cloud variant
    settings = FallbackSettings(
        models_dir=root,
        trusted_keys=[signer.public_key_hex],
        poll_s=0.05,
        keep_versions=1,
        admin_tokens={"adm-secret"},
    )
    app = await build_fallback_app(settings)
    async with TestClient(TestServer(app)) as client:
        assert await served_version(client) == "1"
        # A tampered package, one signed by a stranger, one outside the directory
        # behind a symlink: none of them is served.
        bad = package("2")
        data = bytearray(bad.model_path.read_bytes())
        data[-5] ^= 0xFF
        bad.model_path.write_bytes(bytes(data))
        package("3", signer=Signer.generate())
        outside = make_package(
            tmp_path / "outside", version="4", release=4, variant="cloud", signer=signer
        )
        (root / "link").symlink_to(outside.directory)

        async def refused() -> bool:
            doc = await (await client.get("/v2/repository/index")).json()
            return {e.get("version") for e in doc if e["state"] == "UNAVAILABLE"} >= {"2", "3"}

        await until(refused)
        assert await served_version(client) == "1"
        index = await (await client.get("/v2/repository/index")).json()
        assert {e.get("version") for e in index} == {"1", "2", "3"}
        # A good one: served, and (keep 1) the old one retired.
        package("5")

        async def on_5() -> bool:
            return await served_version(client) == "5"

        await until(on_5)
        assert [r.info.version for r in app[FALLBACK_REPOSITORY]] == ["5"]
        # Repair version 2 in place: it changed, so it is tried again; older, so not served.
        make_package(bad.directory, version="2", release=2, variant="cloud", signer=signer)
        await asyncio.sleep(0.3)
        assert await served_version(client) == "5"
        # Without a control plane, the admin secret loads and unloads; nothing else does.
        unload = "/v2/repository/models/toy/unload"
        assert (await client.post(unload, headers={"Authorization": "Bearer nope"})).status == 403
        resp = await client.post(unload, headers={"Authorization": "Bearer adm-secret"})
        assert resp.status == 200
        assert (await client.post("/v2/models/toy/infer", json=v2_infer_body(1))).status == 404
        resp = await client.post(
            "/v2/repository/models/toy/load", headers={"Authorization": "Bearer adm-secret"}
        )
        assert resp.status == 200 and (await resp.json())["version"] == "5"


async def test_models_dir_that_is_not_a_directory_serves_nothing_yet(tmp_path: Path) -> None:
    """Following starts even when the source cannot be read: not ready, and it says why."""
    app = await build_fallback_app(FallbackSettings(models_dir=tmp_path / "missing", poll_s=1))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/v2/health/ready")).status == 503
        assert (await client.get("/v2/health/live")).status == 200
