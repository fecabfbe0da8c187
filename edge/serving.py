"""The models an agent serves side by side: one Router per name, with its own policy.

Each model gets a ``Router`` (local slot model + its own cloud fallback model,
``cloud_model`` in the config, else the same name) registered in the V2
DataPlane under its name. Policies come from the config (``local_budget_ms``
and ``models.{name}``) overridden by signed ``set-policy`` commands, which are
kept in ``policies.json`` in the state dir so a restart keeps them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.dataplane import DataPlane
from common.errors import InvalidInputError, StoreError
from common.fsutil import atomic_write
from common.inference import InferRequest, InferResponse
from common.manifest import Manifest
from common.names import check_name
from common.policy import ModelPolicy, parse_policy
from common.runtime import LocalRuntime
from edge.cloud_client import CloudClient
from edge.config import AgentConfig
from edge.model_store import SlotModel
from edge.router import Router, RouterPolicy

logger = logging.getLogger(__name__)

COUNTERS = ("requests", "served_local", "served_cloud", "degraded", "cloud_errors")


@dataclass
class Served:
    router: Router
    model: SlotModel | None = None  # the active slot, None while served by the cloud only
    runtime: LocalRuntime | None = None


class ModelServing:
    """Routers by model name, registered in ``dataplane``; policies kept in ``policy_file``."""

    def __init__(self, config: AgentConfig, dataplane: DataPlane, policy_file: Path) -> None:
        self.config = config
        self.dataplane = dataplane
        self._policy_file = policy_file
        self._overrides: dict[str, dict[str, Any]] = self._read_overrides()
        self._served: dict[str, Served] = {}
        # Given to every router (see Router.on_escalated); set by the agent before serving.
        self.on_escalated: Callable[[str, InferRequest, InferResponse, str], None] | None = None

    def _read_overrides(self) -> dict[str, dict[str, Any]]:
        """Kept set-policy changes; one that no longer passes the checks is dropped."""
        try:
            doc = json.loads(self._policy_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            logger.error("ignoring %s: %s", self._policy_file, exc)
            return {}
        out = {}
        for name, policy in (doc if isinstance(doc, dict) else {}).items():
            try:
                out[check_name(name, "model name")] = parse_policy(policy).to_dict()
            except InvalidInputError as exc:
                logger.error("ignoring the kept policy of %r: %s", name, exc)
        return out

    # -- which models ---------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._served)

    def get(self, name: str) -> Served:
        served = self._served.get(name)
        if served is None:
            raise StoreError(f"model {name!r} is not served on this device")
        return served

    async def add(self, name: str) -> Served:
        """The served entry of ``name``: made (cloud only so far) and registered if new."""
        served = self._served.get(name)
        if served is not None:
            return served
        cfg = self.config
        entry = cfg.models.get(name, {})
        remote = None
        if cfg.cloud_url and cfg.cloud_allowed:
            remote = CloudClient(
                cfg.cloud_url,
                str(entry.get("cloud_model", name)),
                token=cfg.cloud_token,
                timeout_s=cfg.cloud_timeout_s,
            )
        router = Router(name, remote, policy=self.policy_of(name))
        router.on_escalated = self.on_escalated
        await router.load()
        served = Served(router)
        self._served[name] = served
        self.dataplane.register(router)
        return served

    async def activate(self, model: SlotModel, runtime: LocalRuntime) -> None:
        """Serve ``runtime`` (loaded, self-tested) as the local model of its package's name."""
        served = await self.add(model.signed.manifest.name)
        served.router.set_local(runtime, model.signed.manifest.routing)
        # NOTE: the old runtime is not unloaded: requests still running hold it, and
        # unloading would fail them; it is freed when the last one lets go.
        served.model, served.runtime = model, runtime

    async def remove(self, name: str) -> None:
        """Stop serving ``name``: off the DataPlane first, then its runtimes."""
        served = self.get(name)
        self.dataplane.unregister(name)
        del self._served[name]
        served.router.set_local(None)  # requests running finish on their snapshot
        await served.router.unload()
        if self._overrides.pop(name, None) is not None:
            self._write_overrides(self._overrides)

    async def close(self) -> None:
        for served in self._served.values():
            await served.router.unload()

    # -- policy ----------------------------------------------------------------------------

    def policy_of(self, name: str) -> RouterPolicy:
        """Config defaults, then the config's ``models.{name}``, then kept set-policy changes."""
        cfg = self.config
        base = RouterPolicy(local_budget_ms=cfg.local_budget_ms, cloud_probe_s=cfg.cloud_probe_s)
        configured = {k: v for k, v in cfg.models.get(name, {}).items() if k != "cloud_model"}
        policy = ModelPolicy()
        if configured:
            policy = parse_policy(configured)
        if name in self._overrides:
            policy = policy.merged(parse_policy(self._overrides[name]))
        return _router_policy(base, policy)

    def set_policy(self, name: str, changes: ModelPolicy) -> RouterPolicy:
        """Apply and keep a checked policy change; StoreError for a model not served."""
        served = self.get(name)
        kept = ModelPolicy(**self._overrides.get(name, {})).merged(changes)
        overrides = {**self._overrides, name: kept.to_dict()}
        self._write_overrides(overrides)  # NOTE: kept before applied: a crash loses nothing
        self._overrides = overrides
        policy = self.policy_of(name)
        served.router.set_policy(policy)
        return policy

    def _write_overrides(self, overrides: dict[str, dict[str, Any]]) -> None:
        atomic_write(self._policy_file, json.dumps(overrides, sort_keys=True).encode())

    # -- budget, status, telemetry -------------------------------------------------------

    def check_memory(self, manifest: Manifest, budget: int | None) -> None:
        """StoreError if loading ``manifest`` would put the loaded model files over budget.

        The estimate is the model files' bytes (the weights ONNX Runtime holds); the
        version being replaced does not count, as it is unloaded after the switch.
        """
        if budget is None:
            return
        used = sum(
            s.model.signed.manifest.file("model").size
            for n, s in self._served.items()
            if s.model is not None and n != manifest.name
        )
        need = manifest.file("model").size
        if used + need > budget:
            raise StoreError(
                f"memory budget exceeded: {manifest.name} {manifest.version} needs {need} "
                f"bytes, {used} of memory_budget_bytes={budget} are held by loaded models"
            )

    def status(self) -> list[dict[str, Any]]:
        """Every model with a local version, for the device status."""
        out = []
        for name in self.names():
            served = self._served[name]
            if served.model is None:
                continue
            m = served.model.signed.manifest
            out.append(
                {
                    "name": name,
                    "version": m.version,
                    "release": m.release,
                    "precision": m.precision,
                    "slot": served.model.slot,
                    "policy": _policy_doc(served.router.policy),
                }
            )
        return out

    def stats(self, *, reset: bool = False) -> dict[str, dict[str, Any]]:
        return {n: s.router.stats(reset=reset) for n, s in self._served.items()}


def merged_stats(per_model: dict[str, dict[str, Any]], main: str) -> dict[str, Any]:
    """One router report for the whole device: counters summed over the models, the rest
    (latencies, circuit) from the ``main`` model (the config's), as before several models."""
    if not per_model:
        return {}
    out = dict(per_model.get(main) or next(iter(per_model.values())))
    for key in COUNTERS:
        out[key] = sum(int(s.get(key, 0)) for s in per_model.values())
    escalated: dict[str, int] = {}
    for s in per_model.values():
        for reason, n in s.get("escalated", {}).items():
            escalated[reason] = escalated.get(reason, 0) + n
    out["escalated"] = escalated
    return out


def _router_policy(base: RouterPolicy, policy: ModelPolicy) -> RouterPolicy:
    changes: dict[str, Any] = {
        "uncertainty_threshold": policy.uncertainty_threshold,
        "max_local_batch": policy.max_local_batch,
    }
    if policy.latency_budget_ms is not None:
        changes["local_budget_ms"] = policy.latency_budget_ms
    return replace(base, **changes)


def _policy_doc(policy: RouterPolicy) -> dict[str, Any]:
    return {
        "latency_budget_ms": policy.local_budget_ms,
        "uncertainty_threshold": policy.uncertainty_threshold,
        "max_local_batch": policy.max_local_batch,
    }
