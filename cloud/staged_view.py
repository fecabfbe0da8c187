"""What an operator sees of a staged rollout: its row, and each device's state in words."""

from __future__ import annotations

import asyncio
from typing import Any

from cloud.staged_store import DONE, StagedStore

VERIFYING = ("downloaded", "verified", "staged", "loaded", "self_tested")


def device_state(d: dict[str, Any]) -> tuple[str, str | None]:
    """What an operator sees for one device: (state, reason)."""
    if d["rolled_back"] == "yes":
        return "rolled back", None
    if d["rolled_back"]:
        return "rollback failed", d["rolled_back"]
    if d["rollback_id"]:
        return "rolling back", d["rollback_error"]
    step = d["step"]
    if step in (None, "sent"):
        return "pending", None
    if step in ("received", "downloading"):
        return "downloading", None
    if step in VERIFYING:
        return "verifying", None
    if step == "activated":
        return "active", None
    return "failed", d["error"]


async def rollout_view(store: StagedStore, rollout_id: str) -> dict[str, Any]:
    r = await asyncio.to_thread(store.get, rollout_id)
    devices = await asyncio.to_thread(store.devices, rollout_id)
    out = []
    for d in devices:
        state, why = device_state(d)
        if state == "downloading" and d["command_id"]:
            percent = await asyncio.to_thread(
                store.download_progress, d["device_id"], d["command_id"]
            )
            state = f"downloading {percent}%" if percent is not None else state
        out.append(
            {
                "device_id": d["device_id"],
                "stage": d["stage"],
                "state": state,
                "reason": why,
                "previous_version": d["previous_version"],
                # None until its stage is sent; NULL rows predate packages: the ONNX one.
                "package": (d["package"] or "onnx") if d["child_id"] else None,
            }
        )
    counts: dict[str, int] = {}
    for d in out:
        counts[d["state"]] = counts.get(d["state"], 0) + 1
    return {**r, "finished": r["phase"] == DONE, "devices": out, "counts": counts}
