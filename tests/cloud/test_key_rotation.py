"""Key custody end to end: a real control plane, real agents, a real Mosquitto.

Rotation reaches the fleet with a keyring signed by the old key; after the old
key is retired or revoked its commands and manifests are refused; forged and
old keyrings are refused; an offline-signing control plane refuses what a
stolen operator token could upload and ships what a release key signed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from cloud.control_cli import ControlClient
from cloud.fallback import FALLBACK_REPOSITORY, FallbackSettings, build_fallback_app
from cloud.keys import KeyStore
from common import topics
from common.device_token import issue_token
from common.errors import VerificationError
from common.fsutil import write_private
from common.keyring import Keyring, sign_keyring, trust_command
from common.manifest import (
    MANIFEST_FILE,
    ChunkList,
    SignedManifest,
    read_package,
    write_package,
    write_unsigned,
)
from common.messages import Command, sign_command
from common.mqtt import MqttLink
from common.signing import Signer, TrustedKey
from edge.agent import EdgeAgent
from fogline.cli import main
from tests.broker_per_test import mosquitto_per_test  # noqa: F401  (own broker)
from tests.edge.agent_harness import ControlPlane, agent_config
from tests.model_fixtures import make_package, v2_infer_body


async def api(
    cp: ControlPlane, method: str, path: str, body: Any = None, role: str = "admin"
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(headers=cp.auth(role)) as s,
        s.request(method, cp.url + path, json=body) as resp,
    ):
        return resp.status, await resp.json()


async def wait_keyring(cp: ControlPlane, device_id: str, version: int) -> None:
    """Until the device reports (``trusted`` event) that it holds keyring ``version``."""
    async with asyncio.timeout(15):
        while True:
            for ev in cp.registry.events(device_id, limit=500):
                if ev.get("stage") == "trusted" and ev.get("keyring_version") == version:
                    return
            await asyncio.sleep(0.05)


async def wait_refusal(cp: ControlPlane, device_id: str, text: str) -> dict:
    """A rejected or failed event whose error says ``text``. An agent says no more than
    "command not verified" (and no id) about a command it could not verify: the reason
    is in its log (``caplog``), since anyone could have sent it."""
    async with asyncio.timeout(15):
        while True:
            for ev in cp.registry.events(device_id, limit=500):
                if ev.get("stage") in ("rejected", "failed") and text in (ev.get("error") or ""):
                    return ev
            await asyncio.sleep(0.05)


async def send(cp: ControlPlane, device_id: str, payload: bytes) -> None:
    await cp.rollouts.link.publish(topics.device_topic(device_id, "commands"), payload)


def deploy(cp: ControlPlane, device_id: str, package: dict, record: Any) -> Command:
    artifact = {"digest": record.artifact_digest, "size": record.artifact_size, "chunk_size": 1024}
    body = {"package": package, "artifact": artifact}
    return Command("deploy", device_id, cp.registry.next_seq(device_id), time.time() + 60, body)


async def test_rotate_then_retire_moves_the_fleet_to_the_new_key(
    mosquitto, tmp_path, caplog
) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        old = cp.signer
        cp.publish_toy(tmp_path, "1")
        v2 = cp.publish_toy(tmp_path, "2", seed=1)
        cfg = agent_config(tmp_path, "dev-k", mosquitto, old.public_key_hex)
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            await wait_keyring(cp, cfg.device_id, 1)  # sent when its status showed keyring 0
            assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"

            seen: list[dict] = []
            async with MqttLink(client_id="spy", host=mosquitto.host, port=mosquitto.port) as spy:
                spy.subscribe(
                    topics.device_topic(cfg.device_id, "commands"),
                    lambda _t, p: seen.append(json.loads(p)),
                )
                await spy.wait_connected(5)
                status, doc = await api(cp, "POST", "/api/keys/rotate")
                assert status == 200 and doc["previous"] == old.key_id
                # NOTE: every device the plane knows, and the session's broker may have shown it
                # other tests' retained status: the count is the registry's, not "1".
                assert doc["sent"] == len(cp.registry.devices())
                new = cp.signer
                assert new.key_id == doc["key_id"] != old.key_id and doc["resigned"] == 2
                await wait_keyring(cp, cfg.device_id, 2)
            # The command that brought the new key, and the keyring in it, are the old key's.
            (trust,) = [c for c in seen if c["command"]["type"] == "trust"]
            keyrings = trust["command"]["body"]["keyrings"]
            assert trust["key_id"] == keyrings[-1]["key_id"] == old.key_id
            assert new.public_key_hex in json.dumps(keyrings[-1]["keyring"])
            assert {k.key_id for k in agent.trust.keys} == {old.key_id, new.key_id}

            status, doc = await api(cp, "POST", f"/api/keys/{old.key_id}/retire")
            assert status == 200 and doc["version"] == 3
            await wait_keyring(cp, cfg.device_id, 3)
            assert [k.key_id for k in agent.trust.keys] == [new.key_id]

            # Published before the rotation, re-signed by the new key: it still deploys.
            assert cp.registry.version("toy", "2").signed.key_id == new.key_id
            assert (await cp.roll_out("toy", "2", [cfg.device_id]))["state"] == "succeeded"

            # The retired key's command is refused ...
            rollback = Command(
                "rollback", cfg.device_id, cp.registry.next_seq(cfg.device_id), time.time() + 60, {}
            )
            await send(cp, cfg.device_id, sign_command(rollback, old))
            await wait_refusal(cp, cfg.device_id, "VerificationError: command not verified")
            assert f"untrusted key '{old.key_id}'" in caplog.text
            # ... and so is its manifest, even inside a command the new key signed.
            stale = make_package(tmp_path / "pkg-3", version="3", release=3, signer=old)
            cmd = deploy(cp, cfg.device_id, stale.signed.to_dict(), v2)
            await send(cp, cfg.device_id, sign_command(cmd, new))
            await wait_refusal(cp, cfg.device_id, f"untrusted key '{old.key_id}'")
            assert agent.active is not None and agent.active.signed.manifest.version == "2"

        # The keyring is kept in the state dir: a restart still trusts the new key only.
        async with EdgeAgent(cfg) as agent:
            assert agent.trust.version == 3 and [k.key_id for k in agent.trust.keys] == [new.key_id]
        status, doc = await api(cp, "GET", "/api/keys")
        assert [(k["key_id"], k["state"]) for k in doc["keys"]] == [
            (new.key_id, "active"),
            (old.key_id, "retired"),
        ]
        assert doc["keys"][0]["public_key"] == new.public_key_hex  # the demo reads keys[0]
        assert "PRIVATE" not in json.dumps(doc)  # public halves and signatures only


async def test_retired_keys_installed_model_loads_a_revoked_ones_does_not(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        old = cp.signer
        cp.publish_toy(tmp_path, "1")
        cfg = agent_config(tmp_path, "dev-v", mosquitto, old.public_key_hex)
        async with EdgeAgent(cfg):
            await cp.wait_online([cfg.device_id])
            assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"
            await api(cp, "POST", "/api/keys/rotate")
            assert (await api(cp, "POST", f"/api/keys/{old.key_id}/retire"))[0] == 200
            await wait_keyring(cp, cfg.device_id, 3)
        # Retired: nothing new, but the model it signed and this device installed still loads.
        async with EdgeAgent(cfg) as agent:
            assert agent.trust.version == 3 and agent.active is not None
            assert agent.active.signed.key_id == old.key_id
            assert (await api(cp, "POST", f"/api/keys/{old.key_id}/revoke"))[0] == 200
            await wait_keyring(cp, cfg.device_id, 4)
            assert old.key_id in agent.trust.revoked
        # Revoked: everything it ever signed is refused, the installed model included.
        async with EdgeAgent(cfg) as agent:
            assert agent.trust.version == 4 and agent.active is None
        status, doc = await api(cp, "POST", f"/api/keys/{cp.signer.key_id}/revoke")
        assert status == 400 and "rotate first" in doc["error"]
        status, doc = await api(cp, "POST", "/api/keys/nope/retire")
        assert status == 400 and "no key" in doc["error"]
        status, doc = await api(cp, "POST", "/api/keys", {"public_key": "zz"})
        assert status == 400 and "error" in doc


async def test_forged_and_old_keyrings_are_refused(mosquitto, tmp_path, caplog) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cfg = agent_config(tmp_path, "dev-f", mosquitto, cp.signer.public_key_hex)
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            await wait_keyring(cp, cfg.device_id, 1)
            stranger = Signer.generate()
            mine = TrustedKey(stranger.key_id, stranger.public_key_hex, "control")
            forged = sign_keyring(Keyring(2, (mine,)), stranger)
            for wrapper in (stranger, cp.signer):  # however the command itself is signed
                await send(cp, cfg.device_id, trust_command(cfg.device_id, [forged], wrapper))
            await wait_refusal(cp, cfg.device_id, "VerificationError: command not verified")
            assert f"untrusted key '{stranger.key_id}'" in caplog.text
            await api(cp, "POST", "/api/keys/rotate")
            await wait_keyring(cp, cfg.device_id, 2)
            # An old, genuine keyring sent again (rollback of the device's trust) is refused.
            history = cp.keys.store.history()
            await send(cp, cfg.device_id, trust_command(cfg.device_id, history[:1], cp.signer))
            await wait_refusal(cp, cfg.device_id, "ReplayError: command not verified")
            assert "keyring version 1 is not newer than 2" in caplog.text
            await asyncio.sleep(0.3)
            assert agent.trust.version == 2 and stranger.key_id not in {
                k.key_id for k in agent.trust.keys
            }


def _unsigned(pkg_dir: Path, manifest: Any) -> Path:
    (pkg_dir / MANIFEST_FILE).unlink()
    write_unsigned(pkg_dir, manifest)
    return pkg_dir


async def test_offline_signing_only_control_plane(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto, require_offline_signature=True) as cp:
        client = ControlClient(cp.url, token=cp.tokens["operator"])
        # What a stolen operator token could send: an unsigned package, or one signed by
        # any key but a trusted release key. All refused with 403.
        unsigned = make_package(tmp_path / "p-unsigned")
        _unsigned(unsigned.directory, unsigned.manifest)
        with pytest.raises(RuntimeError, match=r"HTTP 403.*signed offline"):
            await asyncio.to_thread(client.publish, unsigned.directory)
        by_control = make_package(tmp_path / "p-control", signer=cp.signer)
        with pytest.raises(RuntimeError, match=r"HTTP 403.*control key"):
            await asyncio.to_thread(client.publish, by_control.directory)
        by_stranger = make_package(tmp_path / "p-stranger")
        with pytest.raises(RuntimeError, match=r"HTTP 403.*untrusted key"):
            await asyncio.to_thread(client.publish, by_stranger.directory)
        assert cp.registry.versions() == []

        release = Signer.generate()
        key_file = tmp_path / "release.pem"
        write_private(key_file, release.to_pem())
        status, _ = await api(cp, "POST", "/api/keys", {"public_key": release.public_key_hex})
        assert status == 201
        pkg = make_package(tmp_path / "p-release")
        _unsigned(pkg.directory, pkg.manifest)
        argv = ["model", "sign", "--package", str(pkg.directory), "--key", str(key_file)]
        assert await asyncio.to_thread(main, argv) == 0
        # Signed by the release key, but its chunk list lies about the files: refused.
        signed = read_package(pkg.directory)
        assert signed.manifest.chunks is not None
        wrong = ChunkList(
            signed.manifest.chunks.size, ["0" * 64] * len(signed.manifest.chunks.sha256)
        )
        write_package(
            pkg.directory, SignedManifest.sign(replace(signed.manifest, chunks=wrong), release)
        )
        with pytest.raises(RuntimeError, match=r"HTTP 400.*chunk list"):
            await asyncio.to_thread(client.publish, pkg.directory)
        write_package(pkg.directory, signed)
        record = await asyncio.to_thread(client.publish, pkg.directory)
        assert record["version"] == "1"
        assert cp.registry.version("toy", "1").signed.key_id == release.key_id

        # An agent enrolled with the control key learns the release key from the keyring.
        cfg = agent_config(tmp_path, "dev-o", mosquitto, cp.signer.public_key_hex)
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            await wait_keyring(cp, cfg.device_id, 2)
            assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"
            assert agent.active is not None and agent.active.signed.key_id == release.key_id
        doc = (await api(cp, "GET", "/api/keys"))[1]
        assert doc["require_offline_signature"] is True
        assert {k["key_id"]: k["role"] for k in doc["keys"]}[release.key_id] == "release"


async def _fallback_models(settings: FallbackSettings) -> list[str]:
    app = await build_fallback_app(settings)
    try:
        return [r.info.name for r in app[FALLBACK_REPOSITORY]]
    finally:
        for runtime in app[FALLBACK_REPOSITORY]:
            await runtime.unload()


async def test_fallback_follows_the_signed_keyring(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        old = cp.signer
        by_old = make_package(tmp_path / "c-old", variant="cloud", signer=old)
        await api(cp, "POST", "/api/keys/rotate")
        by_new = make_package(tmp_path / "c-new", variant="cloud", signer=cp.signer)
        # Configured with the old key only, it learns the new one from the keyring.
        settings = FallbackSettings(
            packages=[by_new.directory],
            trusted_keys=[old.public_key_hex],
            control_url=cp.url,
            control_token=cp.tokens["viewer"],
        )
        assert await _fallback_models(settings) == ["toy"]
        # A package signed offline by a release key the keyring names verifies too.
        release = Signer.generate()
        await api(cp, "POST", "/api/keys", {"public_key": release.public_key_hex})
        by_release = make_package(tmp_path / "c-rel", variant="cloud", signer=release)
        assert await _fallback_models(replace(settings, packages=[by_release.directory])) == ["toy"]
        settings.refresh_keys = False
        with pytest.raises(VerificationError, match="untrusted key"):
            await _fallback_models(settings)
        # Retired: a package it signed (e.g. in the cache) still loads.
        assert (await api(cp, "POST", f"/api/keys/{old.key_id}/retire"))[0] == 200
        settings = FallbackSettings(
            packages=[by_old.directory],
            trusted_keys=[old.public_key_hex],
            control_url=cp.url,
            control_token=cp.tokens["viewer"],
        )
        assert await _fallback_models(settings) == ["toy"]
        # While it serves, it keeps following: a device token the retired key signed works
        # until the control plane revokes that key, then it is refused.
        settings = FallbackSettings(
            packages=[by_new.directory],
            trusted_keys=[old.public_key_hex],
            control_url=cp.url,
            control_token=cp.tokens["viewer"],
            device_tokens=True,
            key_refresh_s=0.1,
        )
        app = await build_fallback_app(settings)
        headers = {"Authorization": f"Bearer {issue_token(old, 'dev-1')}"}
        async with TestClient(TestServer(app)) as client:
            resp = await client.post("/v2/models/toy/infer", json=v2_infer_body(1), headers=headers)
            assert resp.status == 200, await resp.text()
            assert (await api(cp, "POST", f"/api/keys/{old.key_id}/revoke"))[0] == 200
            async with asyncio.timeout(10):
                while resp.status == 200:
                    await asyncio.sleep(0.05)
                    resp = await client.post(
                        "/v2/models/toy/infer", json=v2_infer_body(1), headers=headers
                    )
            assert resp.status == 401 and "revoked" in await resp.text()
        # Revoked: everything it signed is refused, the cached package included.
        settings = FallbackSettings(
            packages=[by_old.directory],
            trusted_keys=[old.public_key_hex],
            control_url=cp.url,
            control_token=cp.tokens["viewer"],
        )
        with pytest.raises(VerificationError, match="revoked"):
            await _fallback_models(settings)


async def test_keys_changed_offline_reach_the_fleet_when_the_control_plane_returns(
    mosquitto, tmp_path, capsys
) -> None:
    work = tmp_path / "control"
    assert main(["keys", "create", "--workdir", str(work)]) == 0
    first = KeyStore(work).signer()
    cfg = agent_config(tmp_path, "dev-c", mosquitto, first.public_key_hex)
    async with EdgeAgent(cfg) as agent:
        async with ControlPlane(work, mosquitto) as cp:
            tokens = dict(cp.tokens)  # made once per workdir: the restarted plane has them
            await cp.wait_online([cfg.device_id])
            await wait_keyring(cp, cfg.device_id, 1)
            capsys.readouterr()
            argv = ["keys", "list", "--control", cp.url, "--token", tokens["viewer"]]
            assert await asyncio.to_thread(main, argv) == 0
            assert first.key_id in capsys.readouterr().out
            # Changing keys through it is an admin's job.
            argv = ["keys", "rotate", "--control", cp.url, "--token", tokens["operator"]]
            assert await asyncio.to_thread(main, argv) == 1
            assert "HTTP 403" in capsys.readouterr().err
            # While it runs, the keys are its own: the offline CLI is refused.
            argv = ["keys", "rotate", "--workdir", str(work)]
            assert await asyncio.to_thread(main, argv) == 2
            assert "running control plane" in capsys.readouterr().err
        # Stopped: rotate offline. The agent learns it when the control plane is back.
        assert await asyncio.to_thread(main, ["keys", "rotate", "--workdir", str(work)]) == 0
        async with ControlPlane(work, mosquitto) as cp:
            await wait_keyring(cp, cfg.device_id, 2)  # its retained status said keyring 1
            argv = ["keys", "retire", first.key_id, "--control", cp.url, "--token", tokens["admin"]]
            assert await asyncio.to_thread(main, argv) == 0
            await wait_keyring(cp, cfg.device_id, 3)
            assert [k.key_id for k in agent.trust.keys] == [cp.signer.key_id]
            assert cp.signer.key_id != first.key_id
