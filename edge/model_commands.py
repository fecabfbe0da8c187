"""The signed ``remove`` and ``set-policy`` commands; the Deployer runs them under its
lock (one command at a time) and reports their failures as it does a deploy's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from common import messages
from common.errors import InvalidInputError
from common.messages import Command
from common.names import check_name
from common.policy import parse_policy
from edge.model_library import ModelLibrary
from edge.serving import ModelServing

Emit = Callable[[bytes], Awaitable[None]]
Changed = Callable[[], Awaitable[None]]


class ModelCommands:
    def __init__(
        self,
        serving: ModelServing,
        library: ModelLibrary,
        *,
        device_id: str,
        main_model: str,
        emit: Emit,
        changed: Changed,
    ) -> None:
        """``main_model``: the config's model, served (by the cloud) even when removed."""
        self.serving = serving
        self.library = library
        self.device_id = device_id
        self.main_model = main_model
        self._emit = emit
        self._changed = changed

    def handlers(self) -> dict[str, Callable[[Command], Awaitable[None]]]:
        return {messages.REMOVE: self.remove, messages.SET_POLICY: self.set_policy}

    async def remove(self, cmd: Command) -> None:
        """Stop serving the model, then delete its slots (in that order: no request
        ever reaches a model whose files are going)."""
        name = check_name(cmd.body.get("model"), "model name")
        installed = await asyncio.to_thread(self.library.has, name)
        served = name in self.serving.names()
        if not served and not installed:
            raise InvalidInputError(f"model {name!r} is not served on this device")
        if served:
            await self.serving.remove(name)
        if installed:
            await asyncio.to_thread(self.library.remove, name)
        if name == self.main_model:
            await self.serving.add(name)
        await self._emit(messages.event(self.device_id, cmd.id, messages.REMOVED, model=name))
        await self._changed()

    async def set_policy(self, cmd: Command) -> None:
        """Checked whole before anything changes, then kept (``policies.json``) and applied."""
        name = check_name(cmd.body.get("model"), "model name")
        changes = parse_policy(cmd.body.get("policy"))
        policy = self.serving.set_policy(name, changes)
        await self._emit(
            messages.event(
                self.device_id,
                cmd.id,
                messages.POLICY_SET,
                model=name,
                policy=changes.to_dict(),
                latency_budget_ms=policy.local_budget_ms,
            )
        )
        await self._changed()
