"""Per-device model commands: ``set-policy`` and ``remove``, signed and sent over MQTT.

``POST /api/devices/{device_id}/policy`` ``{"model": NAME, "policy": {...}}`` changes one
device's policy for a model; ``POST /api/models/{name}/policy`` ``{"policy": {...},
"devices": [...]}`` does it for several (default: every online device);
``DELETE /api/devices/{device_id}/models/{name}`` removes a model from a device. Each
answers 202 with the command ids: the device reports ``policy_set`` / ``removed`` (or
``failed``) on its events topic (``GET /api/events?device=ID``).

Everything is checked here before a command is signed -- names (common.names), the
policy (common.policy: NaN, negatives, a threshold above 1), that each device is known
-- and again on the device, which trusts only the signature.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from cloud.operator_tokens import OPERATOR
from cloud.registry import Registry
from cloud.rollout import RolloutController
from common import topics
from common.errors import InvalidInputError
from common.json_object import parse_json_object
from common.messages import REMOVE, SET_POLICY, Command, sign_command
from common.names import check_name
from common.policy import parse_policy

MAX_TARGETS = 10_000


class DeviceCommands:
    """Signs and sends one command per device, with the rollout controller's key and link.

    NOTE: the signer is read from the controller at each send: a key rotation swaps it.
    """

    def __init__(
        self,
        registry: Registry,
        rollouts: RolloutController,
        *,
        enrolled: Callable[[], Iterable[str]] | None = None,
        command_ttl_s: float = 3600.0,
    ) -> None:
        self.registry = registry
        self.rollouts = rollouts
        self.enrolled = enrolled
        self.command_ttl_s = command_ttl_s

    async def check_known(self, devices: list[str]) -> None:
        """Refuse ids never seen and not enrolled, before any command or seq exists."""
        known = await asyncio.to_thread(self.registry.seen_devices, devices)
        if self.enrolled is not None:
            known |= set(await asyncio.to_thread(self.enrolled)) & set(devices)
        unknown = sorted(set(devices) - known)
        if unknown:
            raise InvalidInputError(f"unknown device ids (never seen, not enrolled): {unknown}")

    async def send(self, kind: str, devices: list[str], body: dict[str, Any]) -> dict[str, str]:
        """One signed command of ``kind`` per device; their ids by device."""
        await self.check_known(devices)
        sent = {}
        for device_id in devices:
            seq = await asyncio.to_thread(self.registry.next_seq, device_id)
            cmd = Command(kind, device_id, seq, time.time() + self.command_ttl_s, body)
            payload = sign_command(cmd, self.rollouts.signer)
            await self.rollouts.link.publish(topics.device_topic(device_id, "commands"), payload)
            sent[device_id] = cmd.id
        return sent


COMMANDS = web.AppKey("device_commands", DeviceCommands)


def _body(raw: bytes) -> dict[str, Any]:
    return parse_json_object(raw, "request")


async def device_policy(request: web.Request) -> web.Response:
    device_id = check_name(request.match_info["device_id"], "device id")
    doc = _body(await request.read())
    model = check_name(doc.get("model"), "model name")
    policy = parse_policy(doc.get("policy")).to_dict()
    sent = await request.app[COMMANDS].send(
        SET_POLICY, [device_id], {"model": model, "policy": policy}
    )
    return web.json_response({"model": model, "policy": policy, "commands": sent}, status=202)


async def fleet_policy(request: web.Request) -> web.Response:
    model = check_name(request.match_info["name"], "model name")
    doc = _body(await request.read())
    policy = parse_policy(doc.get("policy")).to_dict()
    devices = doc.get("devices")
    if devices is None:
        devices = request.app[COMMANDS].rollouts.online_devices()
    if not isinstance(devices, list) or len(devices) > MAX_TARGETS:
        raise InvalidInputError(f"'devices' must be a list of at most {MAX_TARGETS} device ids")
    devices = sorted({check_name(d, "device id") for d in devices})
    if not devices:
        raise InvalidInputError("no target devices: none given and none online")
    sent = await request.app[COMMANDS].send(SET_POLICY, devices, {"model": model, "policy": policy})
    return web.json_response({"model": model, "policy": policy, "commands": sent}, status=202)


async def remove_model(request: web.Request) -> web.Response:
    device_id = check_name(request.match_info["device_id"], "device id")
    model = check_name(request.match_info["name"], "model name")
    sent = await request.app[COMMANDS].send(REMOVE, [device_id], {"model": model})
    return web.json_response({"model": model, "commands": sent}, status=202)


# (method, path, handler, role) rows for the control plane's route table.
ROUTES = [
    ("POST", "/api/devices/{device_id}/policy", device_policy, OPERATOR),
    ("POST", "/api/models/{name}/policy", fleet_policy, OPERATOR),
    ("DELETE", "/api/devices/{device_id}/models/{name}", remove_model, OPERATOR),
]
