"""Several models on one real agent, through a real broker and control plane: rollout,
update under traffic, remove, budgets, set-policy, state migration, and attacks."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from common import topics
from common.messages import Command, sign_command
from common.mqtt import MqttLink
from common.signing import Signer, TrustStore
from edge.agent import EdgeAgent
from edge.model_library import ModelLibrary
from edge.model_store import ModelStore
from tests.edge.agent_harness import ControlPlane, agent_config
from tests.fogline_cli import fogline
from tests.model_fixtures import make_package, v2_infer_body


async def infer(agent: EdgeAgent, model: str, **params: Any) -> dict:
    body = v2_infer_body(1, **params)
    url = f"{agent.config.api_url}/v2/models/{model}/infer"
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as resp:
        return {"status": resp.status, **(await resp.json())}


async def listed(agent: EdgeAgent) -> dict[str, list[str]]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{agent.config.api_url}/v2/models") as resp,
    ):
        assert resp.status == 200
        return {m["name"]: m["versions"] for m in (await resp.json())["models"]}


async def api(cp: ControlPlane, method: str, path: str, raw: bytes | None = None, role="operator"):
    headers = {**cp.auth(role), "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, cp.url + path, data=raw, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def reported_models(cp: ControlPlane, device_id: str, want: dict[str, str]) -> list[dict]:
    """Wait until the device's status lists exactly ``want`` (name -> version)."""
    async with asyncio.timeout(15):
        while True:
            dev = {d["device_id"]: d for d in cp.registry.devices()}.get(device_id, {})
            models = dev.get("models") or []
            if {m["name"]: m["version"] for m in models} == want:
                return models
            await asyncio.sleep(0.05)


async def test_two_models_side_by_side_update_under_traffic_and_remove(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cp.publish_toy(tmp_path, "1", name="beta", seed=2)
        cp.publish_toy(tmp_path, "2", name="beta", seed=3)
        cfg = agent_config(tmp_path, "dev-mm", mosquitto, cp.signer.public_key_hex)
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            for name in ("toy", "beta"):
                state = await cp.roll_out(name, "1", [cfg.device_id])
                assert state["state"] == "succeeded", state
            assert await listed(agent) == {"toy": ["1"], "beta": ["1"]}
            await reported_models(cp, cfg.device_id, {"toy": "1", "beta": "1"})
            a, b = await infer(agent, "toy"), await infer(agent, "beta")
            assert (a["model_name"], b["model_name"]) == ("toy", "beta")
            assert a["outputs"][0]["data"] != b["outputs"][0]["data"]  # two different models

            # Update beta while both models take traffic: not one request fails.
            stop = asyncio.Event()
            seen: dict[str, list[tuple[int, str]]] = {"toy": [], "beta": []}

            async def traffic(model: str) -> None:
                while not stop.is_set():
                    answer = await infer(agent, model, **{"fogline.route": "local"})
                    version = answer.get("parameters", {}).get("fogline.model_version")
                    seen[model].append((answer["status"], version))

            clients = [asyncio.create_task(traffic(m)) for m in ("toy", "beta", "toy", "beta")]
            state = await cp.roll_out("beta", "2", [cfg.device_id])
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*clients)
            assert state["state"] == "succeeded", state
            assert {s for s, _ in seen["toy"] + seen["beta"]} == {200}
            assert {v for _, v in seen["toy"]} == {"1"}
            assert seen["beta"][0][1] == "1" and seen["beta"][-1][1] == "2"
            await reported_models(cp, cfg.device_id, {"toy": "1", "beta": "2"})
            # A rollback names its model and touches no other.
            cid = await cp.send_command(cfg.device_id, {"model": "beta"}, kind="rollback")
            assert (await cp.final_event(cfg.device_id, cid))["stage"] == "activated"
            await reported_models(cp, cfg.device_id, {"toy": "1", "beta": "1"})
            cid = await cp.send_command(cfg.device_id, {"model": "gamma"}, kind="rollback")
            ev = await cp.final_event(cfg.device_id, cid)
            assert ev["stage"] == "failed" and "not installed" in ev["error"]

            # Remove beta through the control plane; toy keeps serving.
            status, doc = await api(cp, "DELETE", f"/api/devices/{cfg.device_id}/models/beta")
            assert status == 202, doc
            ev = await cp.final_event(cfg.device_id, doc["commands"][cfg.device_id])
            assert ev["stage"] == "removed" and ev["model"] == "beta", ev
            assert (await infer(agent, "beta"))["status"] == 404
            assert (await infer(agent, "toy"))["status"] == 200
            assert await listed(agent) == {"toy": ["1"]}
            assert not (cfg.state_dir / "models" / "beta").exists()
            await reported_models(cp, cfg.device_id, {"toy": "1"})
            # Removing what is not there is a clear failure, not a silent success.
            status, doc = await api(cp, "DELETE", f"/api/devices/{cfg.device_id}/models/beta")
            ev = await cp.final_event(cfg.device_id, doc["commands"][cfg.device_id])
            assert ev["stage"] == "failed" and "not served" in ev["error"]
            # Rolled out again later, it comes back.
            assert (await cp.roll_out("beta", "2", [cfg.device_id]))["state"] == "succeeded"
        async with EdgeAgent(cfg) as agent:  # a restart serves every installed model
            assert await listed(agent) == {"toy": ["1"], "beta": ["2"]}


async def test_deploys_past_the_memory_or_disk_budget_fail_and_the_rest_serves(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        toy = cp.publish_toy(tmp_path, "1")
        cp.publish_toy(tmp_path, "2", seed=1)
        cp.publish_toy(tmp_path, "3", seed=4)
        cp.publish_toy(tmp_path, "1", name="beta", seed=2)
        weights = toy.manifest.file("model").size
        package = sum(f.size for f in toy.manifest.files)
        key = cp.signer.public_key_hex
        mem = agent_config(
            tmp_path, "dev-mem", mosquitto, key, memory_budget_bytes=weights * 3 // 2
        )
        disk = agent_config(
            tmp_path, "dev-disk", mosquitto, key, disk_budget_bytes=package * 5 // 2
        )
        async with EdgeAgent(mem) as a_mem, EdgeAgent(disk) as a_disk:
            await cp.wait_online([mem.device_id, disk.device_id])
            state = await cp.roll_out("toy", "1", [mem.device_id, disk.device_id])
            assert state["state"] == "succeeded", state
            # Memory: one model's weights fit, two do not. An update of toy still fits.
            state = await cp.roll_out("beta", "1", [mem.device_id])
            ev = await cp.final_event(mem.device_id, state["devices"][mem.device_id]["command_id"])
            assert ev["stage"] == "failed" and "memory budget exceeded" in ev["error"], ev
            assert (await cp.roll_out("toy", "2", [mem.device_id]))["state"] == "succeeded"
            # Disk: toy 1 and 2 in its A/B slots use two packages' worth; beta would need a
            # third. Toy 3 replaces the older slot, so it fits.
            assert (await cp.roll_out("toy", "2", [disk.device_id]))["state"] == "succeeded"
            state = await cp.roll_out("beta", "1", [disk.device_id])
            ev = await cp.final_event(
                disk.device_id, state["devices"][disk.device_id]["command_id"]
            )
            assert ev["stage"] == "failed" and "disk budget exceeded" in ev["error"], ev
            assert (await cp.roll_out("toy", "3", [disk.device_id]))["state"] == "succeeded"
            for agent, version in ((a_mem, "2"), (a_disk, "3")):
                answer = await infer(agent, "toy", **{"fogline.route": "local"})
                assert answer["status"] == 200
                assert answer["parameters"]["fogline.model_version"] == version
                assert (await infer(agent, "beta"))["status"] == 404
                assert await listed(agent) == {"toy": [version]}


async def test_set_policy_round_trip_checked_and_kept_across_restart(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cfg = agent_config(tmp_path, "dev-pol", mosquitto, cp.signer.public_key_hex)
        path = f"/api/devices/{cfg.device_id}/policy"
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"
            before = await infer(agent, "toy")
            assert "fogline.escalation_reason" not in before["parameters"]

            # Refused at the control plane: nothing is signed or sent.
            seq = cp.registry.next_seq(cfg.device_id)
            for raw, match in (
                (b'{"model": "toy", "policy": {"uncertainty_threshold": NaN}}', "NaN"),
                (b'{"model": "toy", "policy": {"uncertainty_threshold": 1.5}}', "0..1"),
                (b'{"model": "toy", "policy": {"latency_budget_ms": -1}}', "latency_budget"),
                (b'{"model": "toy", "policy": {"colour": 1}}', "unknown policy fields"),
                (b'{"model": "../x", "policy": {"max_local_batch": 1}}', "invalid model name"),
                (b'{"model": "toy", "policy": {}}', "sets nothing"),
            ):
                status, doc = await api(cp, "POST", path, raw)
                assert status == 400 and match in doc["error"], (raw, doc)
            status, doc = await api(cp, "POST", "/api/devices/nope/policy", b'{"model": "toy"}')
            assert status == 400
            ok = json.dumps({"model": "toy", "policy": {"uncertainty_threshold": 0.0}}).encode()
            status, doc = await api(cp, "POST", "/api/devices/nope/policy", ok)
            assert status == 400 and "unknown device" in doc["error"]
            status, _ = await api(cp, "POST", path, ok, role="viewer")
            assert status == 403
            assert cp.registry.next_seq(cfg.device_id) == seq + 1  # no command was made

            # Accepted: the device applies it and says so.
            body = {"model": "toy", "policy": {"uncertainty_threshold": 0.0, "max_local_batch": 2}}
            status, doc = await api(cp, "POST", path, json.dumps(body).encode())
            assert status == 202, doc
            ev = await cp.final_event(cfg.device_id, doc["commands"][cfg.device_id])
            assert ev["stage"] == "policy_set" and ev["policy"] == body["policy"], ev
            after = await infer(agent, "toy")  # every score is above 0 now: escalated
            assert after["parameters"]["fogline.escalation_reason"] == "uncertain"
            assert after["parameters"]["fogline.degraded"] is True  # no cloud configured

            # Signed but wrong (the control plane's checks bypassed): failed, nothing changes.
            # NaN cannot even be read as a command (JSON has no NaN): refused unverified.
            nan = {"model": "toy", "policy": {"uncertainty_threshold": float("nan")}}
            await cp.send_command(cfg.device_id, nan, kind="set-policy")
            await cp.wait_event(cfg.device_id, "rejected")
            for bad in (
                {"model": "toy", "policy": {"uncertainty_threshold": 2}},
                {"model": "toy", "policy": {"latency_budget_ms": -5}},
                {"model": "nope", "policy": {"uncertainty_threshold": 0.5}},
                {"model": "../x", "policy": {"uncertainty_threshold": 0.5}},
            ):
                cid = await cp.send_command(cfg.device_id, bad, kind="set-policy")
                ev = await cp.final_event(cfg.device_id, cid)
                assert ev["stage"] == "failed", (bad, ev)
            models = await reported_models(cp, cfg.device_id, {"toy": "1"})
            assert models[0]["policy"]["uncertainty_threshold"] == 0.0
            assert models[0]["policy"]["max_local_batch"] == 2
        kept = json.loads((cfg.state_dir / "policies.json").read_text())
        assert kept == {"toy": {"uncertainty_threshold": 0.0, "max_local_batch": 2}}
        async with EdgeAgent(cfg) as agent:  # kept across a restart
            again = await infer(agent, "toy")
            assert again["parameters"]["fogline.escalation_reason"] == "uncertain"
            assert agent.router.policy.max_local_batch == 2


async def test_forged_foreign_and_path_attacks_remove_nothing(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cfg = agent_config(tmp_path, "dev-victim", mosquitto, cp.signer.public_key_hex)
        topic = topics.device_topic(cfg.device_id, "commands")
        async with (
            EdgeAgent(cfg) as agent,
            MqttLink(client_id="rm-attacker", host=mosquitto.host, port=mosquitto.port) as evil,
        ):
            await cp.wait_online([cfg.device_id])
            assert (await cp.roll_out("toy", "1", [cfg.device_id]))["state"] == "succeeded"
            await evil.wait_connected(5)
            remove = {"model": "toy"}
            seq = cp.registry.next_seq(cfg.device_id) + 10
            expires = time.time() + 60
            # Another device's signed command, an attacker's key, no signature at all.
            foreign = sign_command(Command("remove", "dev-other", seq, expires, remove), cp.signer)
            own = Command("remove", cfg.device_id, seq, expires, remove)
            forged = sign_command(own, Signer.generate())
            unsigned = json.dumps({"command": own.to_dict()}).encode()
            for payload in (foreign, forged, unsigned):
                await evil.publish(topic, payload)
            async with asyncio.timeout(10):
                while (
                    len([e for e in cp.registry.events(cfg.device_id) if e["stage"] == "rejected"])
                    < 3
                ):
                    await asyncio.sleep(0.05)
            # Signed, but a name that would leave the models dir.
            for name in ("../x", "..", "toy/../../keyring.json", ""):
                cid = await cp.send_command(cfg.device_id, {"model": name}, kind="remove")
                ev = await cp.final_event(cfg.device_id, cid)
                assert ev["stage"] == "failed" and "invalid model name" in ev["error"], ev
            status, _ = await api(cp, "DELETE", f"/api/devices/{cfg.device_id}/models/..%2Fx")
            assert status in (400, 404)
            status, doc = await api(cp, "DELETE", "/api/devices/dev-other/models/toy")
            assert status == 400 and "unknown device" in doc["error"]
            answer = await infer(agent, "toy", **{"fogline.route": "local"})
            assert answer["status"] == 200
            assert (cfg.state_dir / "models" / "toy" / "active.json").exists()
            assert sorted(p.name for p in (cfg.state_dir / "models").iterdir()) == ["toy"]


def _legacy_state(state: Path, signer: Signer, versions: list[str]) -> None:
    """A state dir as the single-model agent wrote it: slots/ and active.json at its top."""
    store = ModelStore(state, TrustStore([signer.public_key_hex]))
    for v in versions:
        pkg = make_package(
            state.parent / f"legacy-{v}", version=v, release=int(v), signer=signer, seed=int(v)
        )
        files = {f.name: (pkg.directory / f.name).read_bytes() for f in pkg.manifest.files}
        store.activate(store.stage(pkg.signed, files))


async def test_a_single_model_state_dir_is_migrated_on_first_start(mosquitto, tmp_path):
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cfg = agent_config(tmp_path, "dev-old", mosquitto, cp.signer.public_key_hex)
        _legacy_state(cfg.state_dir, cp.signer, ["1", "2"])
        assert (cfg.state_dir / "active.json").exists()
        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            answer = await infer(agent, "toy", **{"fogline.route": "local"})
            assert answer["parameters"]["fogline.model_version"] == "2"
            assert not (cfg.state_dir / "slots").exists()
            assert not (cfg.state_dir / "active.json").exists()
            # The A/B history came along: a rollback (no model named) returns to 1.
            cid = await cp.send_command(cfg.device_id, {}, kind="rollback")
            assert (await cp.final_event(cfg.device_id, cid))["stage"] == "activated"
            answer = await infer(agent, "toy", **{"fogline.route": "local"})
            assert answer["parameters"]["fogline.model_version"] == "1"


def test_an_interrupted_migration_resumes(tmp_path) -> None:
    """A crash between the two renames of the migration: the next start finishes it."""
    signer = Signer.generate()
    state = tmp_path / "state"
    _legacy_state(state, signer, ["1"])
    trust = TrustStore([signer.public_key_hex])
    tmp = state / "models" / ".migrating"
    tmp.mkdir(parents=True)
    (state / "slots").rename(tmp / "slots")  # crashed here: active.json still at the top
    library = ModelLibrary(state, trust)
    assert library.migrate_legacy("toy") == "toy"
    served = library.store("toy").load_active()
    assert served is not None and served.signed.manifest.version == "1"
    assert library.names() == ["toy"] and not tmp.exists()
    assert library.migrate_legacy("toy") is None  # nothing left to do


async def test_cli_set_policy_and_remove(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        cp.publish_toy(tmp_path, "1", name="beta", seed=2)
        cfg = agent_config(tmp_path, "dev-cli", mosquitto, cp.signer.public_key_hex)
        env = {"FOGLINE_CONTROL": cp.url, "FOGLINE_TOKEN": cp.tokens["operator"]}

        async def run(*args: str, token: str | None = None):
            extra = {**env, "FOGLINE_TOKEN": token} if token else env
            return await asyncio.to_thread(fogline, "model", *args, env=extra)

        async with EdgeAgent(cfg) as agent:
            await cp.wait_online([cfg.device_id])
            for name in ("toy", "beta"):
                assert (await cp.roll_out(name, "1", [cfg.device_id]))["state"] == "succeeded"
            done = await run(
                "set-policy",
                "toy",
                "--uncertainty-threshold",
                "0",
                "--device",
                cfg.device_id,
                "-o",
                "json",
            )
            assert done.returncode == 0, done.stderr
            ev = await cp.final_event(
                cfg.device_id, json.loads(done.stdout)["commands"][cfg.device_id]
            )
            assert ev["stage"] == "policy_set"
            assert agent.serving.get("toy").router.policy.uncertainty_threshold == 0.0
            # Every online device when no --device is given (the fleet route).
            done = await run("set-policy", "beta", "--latency-budget-ms", "25")
            assert done.returncode == 0 and cfg.device_id in done.stdout, done.stderr
            for bad, code in (
                (["--uncertainty-threshold", "nan"], 2),
                (["--max-local-batch", "-1"], 2),
            ):
                refused = await run("set-policy", "toy", *bad)
                assert refused.returncode == code, refused
                assert refused.stderr.startswith("error:") and len(refused.stderr.splitlines()) == 1
            denied = await run(
                "remove", "beta", "--device", cfg.device_id, token=cp.tokens["viewer"]
            )
            assert denied.returncode == 1 and "403" in denied.stderr
            done = await run("remove", "beta", "--device", cfg.device_id, "-o", "json")
            assert done.returncode == 0, done.stderr
            ev = await cp.final_event(
                cfg.device_id, json.loads(done.stdout)["commands"][cfg.device_id]
            )
            assert ev["stage"] == "removed"
            assert await listed(agent) == {"toy": ["1"]}
            budget = agent.serving.policy_of("beta")  # gone with the model
            assert budget.local_budget_ms == cfg.local_budget_ms
