"""Staged, gated rollouts: waves of the existing rollout, a soak, gates, automatic rollback.

Each stage is one ``RolloutController`` rollout (signed deploy commands, one chunk
broadcast, repair) to the stage's devices. After its soak the stage's figures from
agent telemetry are judged against each device's previous version
(``cloud.rollout_plan.judge``); a breach halts the rollout and deploys every updated
device's previous version again (a signed ``allow_downgrade``).

All state is in the registry (``cloud.staged_store``), and a driver loop advances
every unfinished rollout one step per tick under a lease, so a restarted control
plane resumes each stage where it was, and of two replicas on one PostgreSQL only
one drives a given rollout at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from cloud.registry import Registry
from cloud.rollout import RolloutController
from cloud.rollout_plan import Figures, Gates, Targets, assign_stages, judge
from cloud.staged_store import (
    ABORTED,
    DEPLOYING,
    DONE,
    HALTED,
    PAUSED,
    ROLLED_BACK,
    ROLLING_BACK,
    RUNNING,
    SOAKING,
    SUCCEEDED,
    StagedStore,
)
from cloud.staged_view import rollout_view
from common.errors import FoglineError, InvalidInputError, NotFoundError
from common.names import check_name

logger = logging.getLogger(__name__)

# After its soak, a stage whose devices served the old version but have not reported on
# the new one yet waits up to max(2 soaks, this) for a report before it is judged.
MIN_TRAFFIC_WAIT_S = 30.0
Labels = Callable[[], dict[str, dict[str, str]]]


class StagedRollouts:
    def __init__(
        self,
        registry: Registry,
        rollouts: RolloutController,
        *,
        labels: Labels | None = None,
        tick_s: float = 0.5,
        lease_s: float = 15.0,
    ) -> None:
        """``labels``: device -> labels set at enrollment (they win over a status's own)."""
        self.registry = registry
        self.store: StagedStore = registry.staged
        self.rollouts = rollouts
        self.labels = labels or dict
        self.tick_s = tick_s
        self.lease_s = lease_s
        self.owner = f"control-{secrets.token_hex(6)}"
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StagedRollouts:
        self._task = asyncio.create_task(self._loop(), name="staged-rollouts")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # A clean stop hands its rollouts over at once instead of after the lease.
        await asyncio.to_thread(self.store.release, self.owner)

    # -- operator actions --------------------------------------------------------------

    async def create(
        self,
        model: str,
        version: str,
        targets: Targets,
        stages: list[float],
        soak_s: float,
        gates: Gates,
        actor: str,
        reason: str | None = None,
    ) -> str:
        await asyncio.to_thread(self.registry.version, model, version, "edge")  # 404 if none
        chosen, previous = await asyncio.to_thread(self._targets, model, version, targets)
        await self.rollouts.check_known(chosen)
        rollout_id = secrets.token_hex(6)
        plan = assign_stages(chosen, stages)
        spec = {
            "to": targets.to_json(),
            "stages": stages,
            "soak_s": soak_s,
            "gates": gates.__dict__,
        }
        rows = [(d, plan[d], previous.get(d)) for d in chosen]
        await asyncio.to_thread(
            self.store.create, rollout_id, model, version, spec, rows, actor, reason
        )
        logger.info("staged rollout %s: %s %s to %d devices", rollout_id, model, version, len(rows))
        return rollout_id

    def _targets(
        self, model: str, version: str, targets: Targets
    ) -> tuple[list[str], dict[str, str]]:
        """(devices to update, device -> its current version of ``model``)."""
        enrolled = self.labels()
        statuses = {d["device_id"]: d for d in self.registry.devices()}
        if targets.devices:
            candidates = list(targets.devices)
        else:
            seen = [d for d, s in statuses.items() if s.get("state") == "online"]
            pool = set(seen) | (set(enrolled) if targets.labels else set())
            candidates = sorted(
                d
                for d in pool
                if targets.matches(d, enrolled[d] if d in enrolled else _labels(statuses.get(d)))
            )
        previous: dict[str, str] = {}
        for device in candidates:
            for m in (statuses.get(device) or {}).get("models") or []:
                if isinstance(m, dict) and m.get("name") == model and _is_name(m.get("version")):
                    previous[device] = str(m["version"])  # the device's word: a name, or none
        chosen = [d for d in candidates if previous.get(d) != version]
        if not chosen:
            what = "already run this version" if candidates else "match the targets"
            raise InvalidInputError(f"no target devices: none online that {what}")
        return chosen, previous

    async def pause(self, rollout_id: str, actor: str, reason: str | None) -> dict[str, Any]:
        return await self._act(
            rollout_id, "pause", actor, reason, (RUNNING,), state=PAUSED, paused_at=time.time()
        )

    async def resume(self, rollout_id: str, actor: str, reason: str | None) -> dict[str, Any]:
        r = await asyncio.to_thread(self.store.get, rollout_id)
        values: dict[str, Any] = {"state": RUNNING, "paused_at": None}
        if r["soak_until"] is not None and r["paused_at"] is not None:
            values["soak_until"] = r["soak_until"] + (time.time() - r["paused_at"])
        return await self._act(rollout_id, "resume", actor, reason, (PAUSED,), **values)

    async def abort(self, rollout_id: str, actor: str, reason: str | None) -> dict[str, Any]:
        done = await self._act(rollout_id, "abort", actor, reason, (RUNNING, PAUSED), state=ABORTED)
        await self._abort_child(done.get("child_id"))
        return done

    async def rollback(self, rollout_id: str, actor: str, reason: str | None) -> dict[str, Any]:
        allowed = (RUNNING, PAUSED, SUCCEEDED, ABORTED)
        return await self._act(
            rollout_id, "rollback", actor, reason, allowed, state=ROLLED_BACK, phase=ROLLING_BACK
        )

    async def _act(
        self,
        rollout_id: str,
        action: str,
        actor: str,
        reason: str | None,
        allowed: tuple[str, ...],
        **values: Any,
    ) -> dict[str, Any]:
        await asyncio.to_thread(
            self.store.operator_action, rollout_id, action, actor, reason, allowed, **values
        )
        logger.info("staged rollout %s: %s by %s (%s)", rollout_id, action, actor, reason)
        return await self.view(rollout_id)

    async def _abort_child(self, child_id: str | None) -> None:
        if child_id is None:
            return
        # Finished already, or driven by a replica that will see the abort: fine.
        with contextlib.suppress(FoglineError):
            await self.rollouts.abort(child_id)

    # -- views -------------------------------------------------------------------------

    async def view(self, rollout_id: str) -> dict[str, Any]:
        return await rollout_view(self.store, rollout_id)

    # -- the driver ----------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                for rollout_id in await asyncio.to_thread(self.store.unfinished):
                    if await asyncio.to_thread(
                        self.store.claim, rollout_id, self.owner, self.lease_s
                    ):
                        await self._step(rollout_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # NOTE: broad on purpose: one bad step must not end the driver
                logger.exception("staged rollout step failed; retrying")
            await asyncio.sleep(self.tick_s)

    async def _step(self, rollout_id: str) -> None:
        r = await asyncio.to_thread(self.store.get, rollout_id)
        if r["state"] == PAUSED:
            return
        if r["state"] == ABORTED:
            await self._abort_child(r["child_id"])
            await self._finish(r, ABORTED)
        elif r["phase"] == ROLLING_BACK:
            await self._roll_back(r)
        elif r["phase"] == DEPLOYING:
            await self._deploy(r)
        elif r["phase"] == SOAKING and time.time() >= (r["soak_until"] or 0):
            await self._judge(r)

    async def _deploy(self, r: dict[str, Any]) -> None:
        stage = r["stage"]
        devices = await asyncio.to_thread(self.store.devices, r["id"])
        if r["child_id"] is None:
            mine = [d["device_id"] for d in devices if d["stage"] == stage]
            if not mine:  # a stage that adds no device (a small fleet) just soaks again
                await self._soak(r)
                return
            try:
                child = await self.rollouts.start(r["model"], r["version"], mine)
            except (InvalidInputError, NotFoundError) as exc:
                # A target revoked meanwhile, the version deleted: no retry can help.
                breach = {"stage": stage, "metric": "deploy_refused", "error": str(exc)}
                await self._halt(r, {"stage": stage, "error": str(exc)}, breach)
                return
            await asyncio.to_thread(self.store.set_devices, r["id"], mine, child_id=child)
            await asyncio.to_thread(
                self.store.update, r["id"], {"phase": DEPLOYING}, child_id=child
            )
            logger.info("staged rollout %s: stage %d to %d devices", r["id"], stage + 1, len(mine))
            return
        state = await asyncio.to_thread(self.registry.rollout, r["child_id"])
        if state["state"] == "running":
            return
        failed = sum(d["stage"] != "activated" for d in state["devices"].values())
        report, breach = judge(
            stage,
            (failed, len(state["devices"])),
            Figures(),
            Figures(),
            Gates.parse(r["spec"]["gates"]),
        )
        if breach is not None:
            await self._halt(r, report, breach)
        else:
            await self._soak(r)

    async def _soak(self, r: dict[str, Any]) -> None:
        until = time.time() + float(r["spec"]["soak_s"])
        await asyncio.to_thread(
            self.store.update, r["id"], {"state": RUNNING}, phase=SOAKING, soak_until=until
        )

    async def _judge(self, r: dict[str, Any]) -> None:
        """The stage's gates, on every device updated so far, against its previous version."""
        devices = await asyncio.to_thread(self.store.devices, r["id"])
        updated = [d for d in devices if d["stage"] <= r["stage"] and d["step"] == "activated"]
        current = [d for d in devices if d["stage"] == r["stage"] and d["child_id"]]
        failed = sum(d["step"] != "activated" for d in current)
        new = Figures.of(
            await asyncio.to_thread(
                self.store.version_figures,
                r["model"],
                r["version"],
                [d["device_id"] for d in updated],
            )
        )
        old = await asyncio.to_thread(self._baseline, r["model"], updated)
        patience = max(2 * float(r["spec"]["soak_s"]), MIN_TRAFFIC_WAIT_S)
        if not new.requests and old.requests and time.time() < r["soak_until"] + patience:
            return  # traffic before, no report on the new version yet: no verdict on no evidence
        report, breach = judge(
            r["stage"], (failed, len(current)), new, old, Gates.parse(r["spec"]["gates"])
        )
        reports = [*r["reports"], report]
        if breach is not None:
            await self._halt(r, report, breach)
        elif r["stage"] + 1 < len(r["spec"]["stages"]):
            await asyncio.to_thread(
                self.store.update,
                r["id"],
                {"state": RUNNING},
                stage=r["stage"] + 1,
                phase=DEPLOYING,
                child_id=None,
                soak_until=None,
                reports=reports,
            )
        else:
            await asyncio.to_thread(self.store.update, r["id"], {"state": RUNNING}, reports=reports)
            await self._finish(r, SUCCEEDED)

    def _baseline(self, model: str, updated: list[dict[str, Any]]) -> Figures:
        by_version: dict[str, list[str]] = {}
        for d in updated:
            if d["previous_version"]:
                by_version.setdefault(d["previous_version"], []).append(d["device_id"])
        total: dict[str, float] = {}
        for version, ids in by_version.items():
            for k, v in self.store.version_figures(model, version, ids).items():
                total[k] = total.get(k, 0.0) + v
        return Figures.of(total)

    async def _halt(
        self, r: dict[str, Any], report: dict[str, Any], breach: dict[str, Any]
    ) -> None:
        logger.warning("staged rollout %s halted: %s", r["id"], breach)
        await asyncio.to_thread(
            self.store.update,
            r["id"],
            {"state": RUNNING},
            state=HALTED,
            phase=ROLLING_BACK,
            halt_reason=breach,
            reports=[*r["reports"], report],
        )

    async def _roll_back(self, r: dict[str, Any]) -> None:
        """Deploy each updated device's previous version again, then wait for the answers."""
        if r["child_id"]:
            state = await asyncio.to_thread(self.registry.rollout, r["child_id"])
            if state["state"] == "running":
                await self._abort_child(r["child_id"])
        devices = await asyncio.to_thread(self.store.devices, r["id"])
        groups: dict[str, list[str]] = {}
        pending = False
        for d in devices:
            if (
                d["rolled_back"]
                or d["child_id"] is None
                or d["step"] in (None, "sent", "failed", "rejected")
            ):
                continue  # never got the new version (or finished rolling back)
            if d["rollback_id"]:
                pending |= await self._rollback_answer(r["id"], d)
            elif not d["previous_version"]:
                await asyncio.to_thread(
                    self.store.set_devices,
                    r["id"],
                    [d["device_id"]],
                    rolled_back="no previous version",
                )
            else:
                groups.setdefault(d["previous_version"], []).append(d["device_id"])
        for version, ids in groups.items():
            pending = True
            try:
                child = await self.rollouts.start(r["model"], version, ids, allow_downgrade=True)
            except (NotFoundError, InvalidInputError) as exc:
                await asyncio.to_thread(
                    self.store.set_devices,
                    r["id"],
                    ids,
                    rolled_back=f"cannot deploy version {version}: {exc}"[:300],
                )
                continue
            await asyncio.to_thread(self.store.set_devices, r["id"], ids, rollback_id=child)
        if not pending:
            await self._finish(r, r["state"])

    async def _rollback_answer(self, rollout_id: str, d: dict[str, Any]) -> bool:
        """Record how a device's rollback ended; True while it has not."""
        step = d["rollback_step"]
        if step == "activated":
            outcome = "yes"
        elif step in ("failed", "rejected"):
            outcome = f"failed: {d['rollback_error']}"
        else:
            child = await asyncio.to_thread(self.registry.rollout, d["rollback_id"])
            if child["state"] == "running":
                return True
            outcome = f"no answer ({child['state']})"
        await asyncio.to_thread(
            self.store.set_devices, rollout_id, [d["device_id"]], rolled_back=outcome
        )
        return False

    async def _finish(self, r: dict[str, Any], state: str) -> None:
        # Compare-and-set: an operator's rollback or abort since ``r`` was read wins.
        expect = {"state": r["state"], "phase": r["phase"]}
        finished = await asyncio.to_thread(
            self.store.update, r["id"], expect, state=state, phase=DONE, finished_at=time.time()
        )
        if finished:
            logger.info("staged rollout %s: %s", r["id"], state)


def _labels(status: dict[str, Any] | None) -> dict[str, str]:
    labels = (status or {}).get("labels")
    if not isinstance(labels, dict):
        return {}
    return {str(k): str(v) for k, v in labels.items()}


def _is_name(value: object) -> bool:
    try:
        check_name(value, "version")
    except InvalidInputError:
        return False
    return True
