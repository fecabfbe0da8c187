"""``/api/keys``: the signed keyring, and key changes on a running control plane.

Handlers parse HTTP only; ``KeyService`` decides. ``ROUTES`` gives each route the
role the control plane's route table guards it with.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from cloud.key_rollout import KeyService
from cloud.operator_tokens import ADMIN, VIEWER
from common.errors import InvalidInputError
from common.json_object import parse_json_object

KEYS = web.AppKey("keys", KeyService)


async def keys(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[KEYS].document))


async def rotate(request: web.Request) -> web.Response:
    return web.json_response(await request.app[KEYS].rotate())


async def retire(request: web.Request) -> web.Response:
    doc = await request.app[KEYS].change("retire", request.match_info["key_id"])
    return web.json_response(doc)


async def revoke(request: web.Request) -> web.Response:
    doc = await request.app[KEYS].change("revoke", request.match_info["key_id"])
    return web.json_response(doc)


async def add(request: web.Request) -> web.Response:
    """Trust a key made elsewhere: ``{"public_key": HEX, "role": "release"}``."""
    doc = parse_json_object(await request.read(), "key")
    public_key, role = doc.get("public_key"), doc.get("role", "release")
    if not isinstance(public_key, str) or not isinstance(role, str):
        raise InvalidInputError("add a key with {'public_key': HEX, 'role': 'release'}")
    return web.json_response(await request.app[KEYS].change("add", public_key, role), status=201)


# (method, path, handler, role) rows for the control plane's route table. The keyring
# is public data (public keys, signatures), but listed like the rest of the fleet view;
# changing keys is an admin's job.
ROUTES = [
    ("GET", "/api/keys", keys, VIEWER),
    ("POST", "/api/keys", add, ADMIN),
    ("POST", "/api/keys/rotate", rotate, ADMIN),
    ("POST", "/api/keys/{key_id}/retire", retire, ADMIN),
    ("POST", "/api/keys/{key_id}/revoke", revoke, ADMIN),
]
