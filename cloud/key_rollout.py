"""Key changes in a running control plane, and getting the keyrings to the fleet.

``KeyService`` owns the key directory while the control plane runs (it holds
its lock), swaps the signer in place after a rotation, re-signs stored
manifests the old key signed, and sends every device a ``trust`` command with
the keyring history. A device whose status reports an older keyring (it was
offline, enrolled later, or the keys were changed with the CLI while the
control plane was stopped) is sent one when it comes online.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cloud.keys import KeyStore
from cloud.registry import Registry
from cloud.rollout import RolloutController
from common import topics
from common.errors import ForbiddenError, VerificationError
from common.json_object import parse_json_object
from common.keyring import trust_command
from common.manifest import SignedManifest
from common.mqtt import MqttError, MqttLink
from common.signing import Signer, TrustStore

logger = logging.getLogger(__name__)


class KeyService:
    def __init__(
        self,
        store: KeyStore,
        registry: Registry,
        link: MqttLink,
        rollouts: RolloutController,
        *,
        require_offline: bool = False,
        command_ttl_s: float = 3600.0,
    ) -> None:
        self.store = store
        self.registry = registry
        self.link = link
        self.rollouts = rollouts
        self.require_offline = require_offline  # uploads must carry a release key's signature
        self.command_ttl_s = command_ttl_s
        self.signer: Signer = rollouts.signer
        # What this control plane trusts (device tokens, offline-signed uploads): one
        # object, updated in place after every change, so holders of it stay current.
        self.trust = TrustStore([self.signer.public_key_hex])
        self._pushed: dict[str, int] = {}  # device -> keyring version last sent to it
        self._version = 0  # the current keyring's; only this process changes it while it runs
        self._mutex = asyncio.Lock()  # one key change at a time

    async def __aenter__(self) -> KeyService:
        # NOTE: the caller holds ``store.locked()`` for as long as this runs.
        await self._reload()
        self.link.subscribe(topics.all_devices_filter("status"), self._on_status)
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass  # no unsubscribe: it would drop the fleet monitor's handler on the same filter

    async def _reload(self) -> None:
        ring = await asyncio.to_thread(self.store.current)
        self._version = ring.version
        self.trust.adopt(ring.trust_store())

    # -- reading -------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        """``GET /api/keys``: trusted keys (the active one first), and the signed history."""
        history = self.store.history()
        return {
            "version": history[-1]["keyring"]["version"],
            "keys": self.store.listing(),
            "keyring": history[-1],
            "keyrings": history,
            "require_offline_signature": self.require_offline,
        }

    def check_upload(self, signed: SignedManifest | None) -> None:
        """An upload must carry a release key's signature when offline signing is required;
        one that carries a signature must carry a good one."""
        if signed is None:
            if self.require_offline:
                raise ForbiddenError(
                    "this control plane accepts only packages signed offline by a release key "
                    "(fogline model sign --key FILE); an operator token alone cannot publish"
                )
            return
        try:
            signed.verify(self.trust, purpose="release")
        except VerificationError as exc:
            raise ForbiddenError(f"offline signature refused: {exc}") from exc

    # -- changing ------------------------------------------------------------------

    async def rotate(self) -> dict[str, Any]:
        async with self._mutex:
            old, new = await asyncio.to_thread(self.store.rotate)
            self.signer = self.rollouts.signer = new
            resigned = await asyncio.to_thread(self.registry.resign, old.key_id, new)
            await self._reload()
        logger.info(
            "rotated keys: %s -> %s (%d manifests re-signed)", old.key_id, new.key_id, resigned
        )
        # The command that brings the new key is signed by the old one, like the keyring
        # in it. (A later catch-up is signed by the new key: the keyring vouches for it.)
        sent = await self.push_all(signer=old)
        return {"key_id": new.key_id, "previous": old.key_id, "resigned": resigned, "sent": sent}

    async def change(self, action: str, *args: str) -> dict[str, Any]:
        """``retire`` / ``revoke`` a key id, or ``add`` a public key with a role."""
        async with self._mutex:
            method = {"retire": self.store.retire, "revoke": self.store.revoke}.get(action)
            if method is not None:
                await asyncio.to_thread(method, *args)
            else:
                await asyncio.to_thread(self.store.add, *args)
            await self._reload()
            version = self._version
        logger.info("keys: %s %s (keyring %d)", action, args[0][:16], version)
        return {"version": version, "sent": await self.push_all()}

    # -- pushing to the fleet ------------------------------------------------------------

    async def push_all(self, signer: Signer | None = None) -> int:
        """Send the keyrings to every device the registry knows; returns how many got it."""
        devices = await asyncio.to_thread(self.registry.devices)
        sent = 0
        for device in devices:
            try:
                await self.push(str(device["device_id"]), signer)
                sent += 1
            except MqttError as exc:  # it catches up from its status when it is back
                logger.warning("keyring to %s not sent: %s", device["device_id"], exc)
        return sent

    async def push(self, device_id: str, signer: Signer | None = None) -> None:
        history = await asyncio.to_thread(self.store.history)
        payload = trust_command(device_id, history, signer or self.signer, self.command_ttl_s)
        await self.link.publish(topics.device_topic(device_id, "commands"), payload)
        self._pushed[device_id] = self._version = int(history[-1]["keyring"]["version"])

    async def _on_status(self, topic: str, payload: bytes) -> None:
        try:
            device_id = topics.parse(topic).ident
            doc = parse_json_object(payload, "status")
        except ValueError:
            return  # the fleet monitor logs it
        reported = doc.get("keyring_version", 0)
        if doc.get("state") != "online" or not isinstance(reported, int):
            return
        current = self._version
        if reported < current and self._pushed.get(device_id, 0) < current:
            logger.info("device %s holds keyring %s of %s: sending", device_id, reported, current)
            try:
                await self.push(device_id)
            except MqttError as exc:
                logger.warning("keyring to %s not sent: %s", device_id, exc)
