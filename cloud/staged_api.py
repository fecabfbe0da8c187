"""``/api/staged-rollouts`` and ``/api/audit``: staged rollouts and who did what to them.

Handlers parse HTTP only; ``StagedRollouts`` decides. ``ROUTES`` gives each route the
role the control plane's route table guards it with. Every action is recorded in
the audit log under the caller's token name, with the ``reason`` given.

NOTE: the automatic rollback, and ``rollback``, deploy each device's *own* previous
version (recorded when the rollout was created) with ``allow_downgrade``: an
operator may do that, unlike a downgrade to any version, which needs an admin.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from cloud.audit_log import check_reason
from cloud.control_auth import CALLER
from cloud.operator_tokens import OPERATOR, VIEWER, Operator
from cloud.rollout_plan import DEFAULT_STAGES, Gates, Targets, parse_duration, parse_stages
from cloud.staged_rollout import StagedRollouts
from common.errors import InvalidInputError
from common.json_object import parse_json_object
from common.names import check_name

STAGED = web.AppKey("staged", StagedRollouts)
CREATE_KEYS = {"model", "version", "to", "stages", "soak", "reason", *Gates().__dict__}
MAX_AUDIT = 1000


def _caller(request: web.Request) -> str:
    caller = request[CALLER]
    assert isinstance(caller, Operator)  # these routes take operator tokens only
    return caller.name


async def _body(request: web.Request, what: str) -> dict[str, Any]:
    raw = await request.read()
    return parse_json_object(raw, what) if raw else {}


async def create(request: web.Request) -> web.Response:
    """``{"model", "version", "to": "all"|[ids]|"k=v,k=v", "stages": "5%,25%,100%",
    "soak": "10m", "max_failure_rate", "max_escalation_increase", "max_latency_increase",
    "min_latency_increase_ms", "reason"}``."""
    doc = await _body(request, "staged rollout request")
    unknown = set(doc) - CREATE_KEYS
    if unknown:
        raise InvalidInputError(f"unknown fields: {sorted(unknown)[:5]}")
    try:
        model = check_name(doc["model"], "model name")
        version = check_name(doc["version"], "model version")
    except KeyError as exc:
        raise InvalidInputError(f"a staged rollout needs {exc.args[0]!r}") from None
    targets = Targets.parse(doc.get("to", "all"))
    stages = parse_stages(doc.get("stages", list(DEFAULT_STAGES)))
    soak_s = parse_duration(doc.get("soak", "10m"))
    gates = Gates.parse(doc)
    reason = check_reason(doc.get("reason"))
    rollout_id = await request.app[STAGED].create(
        model, version, targets, stages, soak_s, gates, _caller(request), reason
    )
    return web.json_response(await request.app[STAGED].view(rollout_id), status=201)


async def listing(request: web.Request) -> web.Response:
    staged = request.app[STAGED]
    records = await asyncio.to_thread(staged.store.recent)
    return web.json_response({"rollouts": [await staged.view(r["id"]) for r in records]})


async def show(request: web.Request) -> web.Response:
    rollout_id = check_name(request.match_info["id"], "rollout id")
    return web.json_response(await request.app[STAGED].view(rollout_id))


def _action(name: str):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.Response:
        rollout_id = check_name(request.match_info["id"], "rollout id")
        doc = await _body(request, f"{name} request")
        if set(doc) - {"reason"}:
            raise InvalidInputError("the only field is 'reason'")
        reason = check_reason(doc.get("reason"))
        act = getattr(request.app[STAGED], name)
        return web.json_response(await act(rollout_id, _caller(request), reason))

    handler.__name__ = name
    return handler


async def audit(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise InvalidInputError("'limit' must be an integer") from None
    if not 1 <= limit <= MAX_AUDIT:
        raise InvalidInputError(f"'limit' must be in [1, {MAX_AUDIT}]")
    entries = await asyncio.to_thread(request.app[STAGED].registry.audit.entries, limit)
    return web.json_response({"entries": entries})


ROUTES = [
    ("POST", "/api/staged-rollouts", create, OPERATOR),
    ("GET", "/api/staged-rollouts", listing, VIEWER),
    ("GET", "/api/staged-rollouts/{id}", show, VIEWER),
    ("POST", "/api/staged-rollouts/{id}/pause", _action("pause"), OPERATOR),
    ("POST", "/api/staged-rollouts/{id}/resume", _action("resume"), OPERATOR),
    ("POST", "/api/staged-rollouts/{id}/abort", _action("abort"), OPERATOR),
    ("POST", "/api/staged-rollouts/{id}/rollback", _action("rollback"), OPERATOR),
    # Who did what and why names operators and their reasons: operators and up only.
    ("GET", "/api/audit", audit, OPERATOR),
]
