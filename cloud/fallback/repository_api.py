"""The V2 model repository extension, and who may use it.

``GET|POST /v2/repository/index`` lists the models (any caller of the V2 API);
``POST /v2/repository/models/{m}/load|unload`` change them and need an operator.

Who is an operator: the fallback holds no operator tokens (the control plane
stores only their hashes), so it asks the control plane (``GET /api/whoami``)
and keeps the answer ``operator_cache_s`` seconds (a revoked token works here
at most that long after); invalid tokens are remembered a few seconds too, so
guessing costs the control plane little. Replicas share nothing but the
control plane. Without one (``--models-dir``), ``--admin-token`` secrets do.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict

from aiohttp import web

from cloud.fallback.follower import Follower
from cloud.operator_tokens import OPERATOR, ROLES, TOKEN_PREFIX
from cloud.package_cache import whoami
from common.errors import AuthError, ForbiddenError, InvalidInputError
from common.json_object import parse_json_object
from common.names import check_name

FOLLOWER = web.AppKey("fogline.fallback.follower", Follower)
NEGATIVE_TTL_S = 5.0
MAX_CACHED = 1024


class OperatorCheck:
    """Operator tokens, verified by the control plane (cached), or admin secrets."""

    def __init__(self, control_url: str | None, admin_tokens: set[str], *, ttl_s: float) -> None:
        self.control_url = control_url
        self.admin_tokens = frozenset(admin_tokens)
        self.ttl_s = ttl_s
        # sha256(token) -> (expires at, role or None for invalid); oldest first
        self._cache: OrderedDict[str, tuple[float, str | None]] = OrderedDict()

    def is_admin_secret(self, token: str) -> bool:
        return any(hmac.compare_digest(token.encode(), t.encode()) for t in self.admin_tokens)

    def is_operator_token(self, token: str) -> bool:
        return self.control_url is not None and token.startswith(TOKEN_PREFIX)

    async def role(self, token: str) -> str:
        """The token's role; AuthError if the control plane does not know it."""
        if self.is_admin_secret(token):
            return "admin"
        if not self.is_operator_token(token):
            raise ForbiddenError("this needs an operator token (role operator or admin)")
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is None or hit[0] < now:
            try:
                doc = await whoami(self.control_url or "", token)
                role: str | None = doc["role"] if doc["role"] in ROLES else None
            except AuthError:
                role = None
            hit = (now + (self.ttl_s if role else min(self.ttl_s, NEGATIVE_TTL_S)), role)
            self._cache[key] = hit
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        if hit[1] is None:
            raise AuthError("invalid or revoked operator token")
        return hit[1]

    async def require(self, request: web.Request, role: str = OPERATOR) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("missing 'Authorization: Bearer <token>' header")
        have = await self.role(token)
        if ROLES.index(have) < ROLES.index(role):
            raise ForbiddenError(f"this needs role {role!r}; the token is {have!r}")


OPERATOR_CHECK = web.AppKey("fogline.fallback.operators", OperatorCheck)


def add_repository_routes(app: web.Application, follower: Follower, check: OperatorCheck) -> None:
    app[FOLLOWER] = follower
    app[OPERATOR_CHECK] = check
    r = app.router
    r.add_get("/v2/repository/index", _index, name="v2.repository.index")
    r.add_post("/v2/repository/index", _index, name="v2.repository.index.post")
    r.add_post("/v2/repository/models/{model}/load", _load, name="v2.repository.load")
    r.add_post("/v2/repository/models/{model}/unload", _unload, name="v2.repository.unload")


async def _index(request: web.Request) -> web.Response:
    body = await request.read() if request.method == "POST" else b""
    doc = parse_json_object(body, "repository index request") if body.strip() else {}
    ready_only = doc.get("ready", False)
    if not isinstance(ready_only, bool):
        raise InvalidInputError(f"'ready' must be true or false, got {ready_only!r}")
    entries = request.app[FOLLOWER].index()
    if ready_only:
        entries = [e for e in entries if e["state"] == "READY"]
    return web.json_response(entries)


async def _load(request: web.Request) -> web.Response:
    await request.app[OPERATOR_CHECK].require(request)
    name = check_name(request.match_info["model"], "model name")
    served = await request.app[FOLLOWER].load_model(name)
    return web.json_response({"name": name, "version": served.info.version, "state": "READY"})


async def _unload(request: web.Request) -> web.Response:
    await request.app[OPERATOR_CHECK].require(request)
    name = check_name(request.match_info["model"], "model name")
    request.app[FOLLOWER].unload_model(name)
    return web.json_response({"name": name, "state": "UNAVAILABLE", "reason": "unloaded"})
