"""Staged, gated rollouts with a real broker, a real control plane and real agents.

A version that passes its self-test but escalates every request (routing threshold 0)
is the bad release the escalation gate must catch; the good one changes only weights.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from common.manifest import RoutingHints
from edge.agent import EdgeAgent
from tests.broker_per_test import mosquitto_per_test  # noqa: F401  (own broker)
from tests.edge.agent_harness import ControlPlane, agent_config, share_store
from tests.edge.staged_harness import (
    Traffic,
    api,
    served_version,
    wait_baseline,
    wait_finished,
    wait_for,
)
from tests.fogline_cli import fogline

ESCALATE_ALL = RoutingHints(uncertainty_threshold=0.0)
# Latency on a shared 2-core machine is noise; those tests gate on escalations and installs.
NO_LATENCY_GATE = 100.0


async def _fleet(stack: contextlib.AsyncExitStack, cp: ControlPlane, tmp: Path, broker, n: int):
    configs = [
        agent_config(tmp, f"dev-{i}", broker, cp.signer.public_key_hex, labels=_labels(i))
        for i in range(n)
    ]
    agents = [await stack.enter_async_context(EdgeAgent(c)) for c in configs]
    await cp.wait_online([c.device_id for c in configs])
    state = await cp.roll_out("toy", "1", [c.device_id for c in configs])
    assert state["state"] == "succeeded", state
    return agents, [c.device_id for c in configs]


def _labels(i: int) -> dict[str, str]:
    return {"site": "berlin" if i < 3 else "paris", "arch": "x86_64"}


@pytest.mark.slow
async def test_three_stages_complete_and_a_bad_version_is_halted_and_rolled_back(
    mosquitto, tmp_path
) -> None:
    async with (
        ControlPlane(tmp_path / "control", mosquitto) as cp,
        contextlib.AsyncExitStack() as stack,
    ):
        cp.publish_toy(tmp_path, "1")
        cp.publish_toy(tmp_path, "2", seed=1)
        cp.publish_toy(tmp_path, "3", seed=2, routing=ESCALATE_ALL)
        agents, ids = await _fleet(stack, cp, tmp_path, mosquitto, 4)
        await stack.enter_async_context(Traffic(agents))
        await wait_baseline(cp, "toy", "1", ids)

        # 1. A good version, three stages to every online device: it completes.
        status, created = await api(
            cp,
            "POST",
            "/api/staged-rollouts",
            {
                "model": "toy",
                "version": "2",
                "to": "all",
                "stages": "25%,50%,100%",
                "soak": "3s",
                "max_latency_increase": NO_LATENCY_GATE,
                "reason": "weights refresh",
            },
        )
        assert status == 201, created
        assert [d["stage"] for d in created["devices"]] == [0, 1, 2, 2]
        done = await wait_finished(cp, created["id"])
        assert done["state"] == "succeeded", done
        assert [d["state"] for d in done["devices"]] == ["active"] * 4
        assert len(done["reports"]) == 3
        escalation = [c for c in done["reports"][-1]["checks"] if c["metric"] == "escalation_rate"]
        assert escalation[0]["judged"] and not escalation[0]["breached"]
        for agent in agents:
            assert await served_version(agent) == "2"
        await wait_baseline(cp, "toy", "2", ids)

        # 2. A version that escalates everything, to the berlin devices: the first stage
        # breaches the escalation gate, the rollout halts, and that device goes back to 2.
        status, bad = await api(
            cp,
            "POST",
            "/api/staged-rollouts",
            {
                "model": "toy",
                "version": "3",
                "to": "site=berlin",
                "stages": [33, 100],
                "soak": "3s",
                "max_latency_increase": NO_LATENCY_GATE,
            },
        )
        assert status == 201, bad
        assert [d["device_id"] for d in bad["devices"]] == ["dev-0", "dev-1", "dev-2"]
        halted = await wait_finished(cp, bad["id"])
        assert halted["state"] == "halted", halted
        reason = halted["halt_reason"]
        assert (reason["metric"], reason["stage"], reason["threshold"]) == (
            "escalation_rate",
            0,
            0.05,
        )
        assert reason["value"] > 0.5 and reason["baseline"] < 0.05
        states = {d["device_id"]: d["state"] for d in halted["devices"]}
        assert states == {"dev-0": "rolled back", "dev-1": "pending", "dev-2": "pending"}
        for agent in agents:
            assert await served_version(agent) == "2"  # dev-0 rolled back; dev-3 never targeted
        listed = {
            r["id"]: r["state"]
            for r in (await api(cp, "GET", "/api/staged-rollouts"))[1]["rollouts"]
        }
        assert listed == {created["id"]: "succeeded", bad["id"]: "halted"}
        # The CLI's watch of a finished rollout: 0 for the healthy one, 1 for the halted one.
        env = {"FOGLINE_CONTROL": cp.url, "FOGLINE_TOKEN": cp.tokens["viewer"]}
        ok = await asyncio.to_thread(
            fogline, "rollout", "status", created["id"], "--watch", env=env
        )
        assert ok.returncode == 0, ok.stderr
        failed = await asyncio.to_thread(
            fogline, "rollout", "status", bad["id"], "--watch", "-o", "json", env=env
        )
        assert failed.returncode == 1, failed.stderr
        assert '"metric": "escalation_rate"' in failed.stdout


@pytest.mark.slow
async def test_pause_resume_abort_watch_timeout_and_the_audit_log(mosquitto, tmp_path) -> None:
    async with (
        ControlPlane(tmp_path / "control", mosquitto) as cp,
        contextlib.AsyncExitStack() as stack,
    ):
        cp.publish_toy(tmp_path, "1")
        cp.publish_toy(tmp_path, "2", seed=1)
        _, ids = await _fleet(stack, cp, tmp_path, mosquitto, 2)
        env = {"FOGLINE_CONTROL": cp.url, "FOGLINE_TOKEN": cp.tokens["operator"]}
        created = await asyncio.to_thread(
            fogline,
            "rollout",
            "create",
            "toy",
            "2",
            "--to",
            ",".join(ids),
            "--stages",
            "50%,100%",
            "--soak",
            "1h",
            "--reason",
            "canary",
            "-o",
            "json",
            env=env,
        )
        assert created.returncode == 0, created.stderr
        rollout_id = created.stdout.split('"id": "')[1].split('"')[0]
        await wait_for(cp, rollout_id, lambda v: v["phase"] == "soaking")

        watched = await asyncio.to_thread(
            fogline, "rollout", "status", rollout_id, "--watch", "--timeout", "1s", env=env
        )
        assert watched.returncode == 3, watched.stderr

        # A viewer may look, not pause.
        status, doc = await api(
            cp, "POST", f"/api/staged-rollouts/{rollout_id}/pause", {}, "viewer"
        )
        assert status == 403, doc
        status, doc = await api(
            cp, "POST", f"/api/staged-rollouts/{rollout_id}/pause", {"reason": "lunch"}
        )
        assert (status, doc["state"]) == (200, "paused"), doc
        status, doc = await api(cp, "POST", f"/api/staged-rollouts/{rollout_id}/pause", {})
        assert status == 409 and "paused" in doc["error"]
        status, doc = await api(cp, "POST", f"/api/staged-rollouts/{rollout_id}/resume", {})
        assert (status, doc["state"], doc["phase"]) == (200, "running", "soaking"), doc

        aborted = await asyncio.to_thread(
            fogline, "rollout", "abort", rollout_id, "--reason", "wrong build", env=env
        )
        assert aborted.returncode == 0, aborted.stderr
        done = await wait_finished(cp, rollout_id)
        assert done["state"] == "aborted"
        assert sorted(d["state"] for d in done["devices"]) == ["active", "pending"]
        # Pausing or resuming a finished rollout is a conflict, not a silent no-op.
        for action in ("pause", "resume", "abort"):
            status, doc = await api(cp, "POST", f"/api/staged-rollouts/{rollout_id}/{action}", {})
            assert status == 409, (action, doc)
        # An operator may roll back what it rolled out: dev-0 goes back to version 1.
        rolled = await asyncio.to_thread(
            fogline, "rollout", "rollback", rollout_id, "--reason", "undo canary", env=env
        )
        assert rolled.returncode == 0, rolled.stderr
        done = await wait_finished(cp, rollout_id)
        assert done["state"] == "rolled_back"
        assert sorted(d["state"] for d in done["devices"]) == ["pending", "rolled back"]
        status, doc = await api(cp, "POST", f"/api/staged-rollouts/{rollout_id}/rollback", {})
        assert status == 409, doc

        audit = await asyncio.to_thread(fogline, "audit", "-o", "json", env=env)
        assert audit.returncode == 0, audit.stderr
        entries = [
            (e["actor"], e["action"], e["reason"])
            for e in __import__("json").loads(audit.stdout)["entries"]
            if e["target"] == rollout_id
        ]
        assert entries == [
            ("test-operator", "rollback", "undo canary"),
            ("test-operator", "abort", "wrong build"),
            ("test-operator", "resume", None),
            ("test-operator", "pause", "lunch"),
            ("test-operator", "create", "canary"),
        ]
        status, _ = await api(cp, "GET", "/api/audit", role="viewer")
        assert status == 403


async def test_a_restart_mid_soak_resumes_the_stage(mosquitto, tmp_path) -> None:
    workdir = tmp_path / "control"
    async with contextlib.AsyncExitStack() as stack:
        async with ControlPlane(workdir, mosquitto) as cp:
            cp.publish_toy(tmp_path, "1")
            cp.publish_toy(tmp_path, "2", seed=1)
            agents, _ids = await _fleet(stack, cp, tmp_path, mosquitto, 2)
            status, created = await api(
                cp,
                "POST",
                "/api/staged-rollouts",
                {"model": "toy", "version": "2", "stages": "50%,100%", "soak": "3s"},
            )
            assert status == 201, created
            await wait_for(cp, created["id"], lambda v: v["phase"] == "soaking")
        # The control plane is gone mid-soak; a new process on the same state picks it up.
        async with ControlPlane(workdir, mosquitto) as cp:
            done = await wait_finished(cp, created["id"])
            assert done["state"] == "succeeded", done
            assert [d["state"] for d in done["devices"]] == ["active", "active"]
            # Agents report download progress; the view shows it while it lasts.
            said = [e.get("progress") for e in cp.registry.events("dev-1") if e.get("progress")]
            assert said and set(said) <= {25, 50, 75}, said
        for agent in agents:
            assert await served_version(agent) == "2"


async def test_two_control_planes_on_one_postgres_handle_each_event_once(
    mosquitto, tmp_path, postgres_url
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    shared = {"database": postgres_url, "share_group": "control"}
    async with ControlPlane(first, mosquitto, **shared) as a, contextlib.AsyncExitStack() as stack:
        a.publish_toy(tmp_path, "1")
        a.publish_toy(tmp_path, "2", seed=1)
        share_store(first, second)
        b = await stack.enter_async_context(ControlPlane(second, mosquitto, **shared))
        b.tokens = a.tokens  # one database: one set of operator tokens
        _agents, _ids = await _fleet(stack, a, tmp_path, mosquitto, 3)
        # Created through one replica, driven by whichever holds its lease.
        status, created = await api(
            b,
            "POST",
            "/api/staged-rollouts",
            {"model": "toy", "version": "2", "stages": "34%,100%", "soak": "1s"},
        )
        assert status == 201, created
        done = await wait_finished(a, created["id"])
        assert done["state"] == "succeeded", done
        # A device's event sent twice (an outbox retry): stored once, by either replica.
        event = {"command_id": None, "stage": "received", "event_id": "e" * 32, "ts": 1.0}
        for _ in range(2):
            await a.rollouts.link.publish(
                "fogline/v1/devices/dev-0/events", __import__("json").dumps(event).encode()
            )
        fleets = [a.rollouts.fleet, b.rollouts.fleet]
        async with asyncio.timeout(10):
            while sum(f.stats["events_duplicate"] for f in fleets) < 1:
                await asyncio.sleep(0.05)
        stored = a.registry.events(limit=10_000)
        event_ids = [e["event_id"] for e in stored]
        assert len(event_ids) == len(set(event_ids))
        handled = [f.stats["events_handled"] for f in fleets]
        assert sum(handled) == len(stored)
        assert min(handled) > 0, handled  # the broker shared the events between the two
        assert event_ids.count("e" * 32) == 1
