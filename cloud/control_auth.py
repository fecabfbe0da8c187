"""The control plane's door: who is calling (bearer tokens, roles) and what they upload.

``guarded`` wraps each route handler with the role the route table gives it, so
the table in ``control_server`` is the one place that says who may do what.
``receive_package`` reads a multipart publish with every name checked and every
byte counted before it reaches the disk.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from cloud.enrollment import RevokedDevices
from cloud.operator_tokens import TOKEN_PREFIX, VIEWER, Operator, OperatorTokens
from common.device_token import verify_token
from common.errors import AuthError, FoglineError, ForbiddenError, InvalidInputError
from common.json_object import parse_json_object
from common.manifest import Manifest, SignedManifest
from common.names import check_name
from common.signing import TrustStore

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPERATORS = web.AppKey("operators", OperatorTokens)
TRUST = web.AppKey("device_token_trust", TrustStore)  # keys that sign device tokens
REVOKED = web.AppKey("revoked_devices", RevokedDevices)  # whose tokens are refused
UPLOAD_LIMIT = web.AppKey("upload_limit", int)  # bytes, all files of one publish
# The caller of a guarded route: the Operator, or the device id of a device token.
CALLER = web.RequestKey("caller", object)
DEVICE_OR_VIEWER = "device-or-viewer"  # artifacts: an agent's device token also opens them
DEVICE = "device"  # a device token only: what a device reports is attributed to it
MAX_MANIFEST_BYTES = 1024**2
BLOCK = 1 << 16


def bearer_token(request: web.Request) -> str:
    """The bearer token of a request; AuthError (401) if there is none."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("this route needs a token: send 'Authorization: Bearer <token>'")
    return token.strip()


async def authenticate(request: web.Request, role: str) -> Operator | str:
    """The caller, if its token is valid and allows ``role``; AuthError / ForbiddenError."""
    token = bearer_token(request)
    if role in (DEVICE, DEVICE_OR_VIEWER) and not token.startswith(TOKEN_PREFIX):
        claims = verify_token(request.app[TRUST], token)
        if request.app[REVOKED].current().refuses(claims):
            raise AuthError(f"device {claims.device_id!r} was revoked")
        return claims.device_id
    operator = await asyncio.to_thread(request.app[OPERATORS].verify, token)
    if role == DEVICE:  # a valid operator token, but what a device reports must be its own
        raise ForbiddenError("this route takes a device's own token, not an operator's")
    operator.require(VIEWER if role == DEVICE_OR_VIEWER else role)
    return operator


def guarded(handler: Handler, role: str | None) -> Handler:
    """``handler`` behind a token check for ``role`` (``None``: a public route)."""
    if role is None:
        return handler

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        request[CALLER] = await authenticate(request, role)
        return await handler(request)

    return checked


async def receive_package(
    request: web.Request, dest: Path, check: Callable[[SignedManifest | None], None]
) -> Manifest | SignedManifest:
    """Read a publish upload into ``dest``: the manifest part first, then its files.

    The manifest part is ``manifest`` (unsigned: the control plane signs it) or
    ``signed_manifest`` (signed offline by a release key; returned as it came).
    ``check`` judges it (the signed manifest, or None) before a file byte is read,
    so an upload that will be refused costs no disk.

    Each file part must be named in the manifest, once, and is cut off at the size
    the manifest gives it; all of them together at the route's upload limit (413).
    Nothing but checked names ever becomes a path.
    """
    if not request.content_type.startswith("multipart/"):
        raise InvalidInputError("publish expects multipart/form-data: manifest + files")
    limit = request.app[UPLOAD_LIMIT]
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        return await _receive_parts(await request.multipart(), dest, limit, check)
    except FoglineError:
        raise
    except (HttpProcessingError, ValueError) as exc:  # aiohttp's multipart parser refused it
        raise InvalidInputError(f"publish: malformed multipart body: {exc}") from None


async def _receive_parts(
    reader: MultipartReader,
    dest: Path,
    limit: int,
    check: Callable[[SignedManifest | None], None],
) -> Manifest | SignedManifest:
    manifest: Manifest | None = None
    signed: SignedManifest | None = None
    received: set[str] = set()
    total = 0
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            raise InvalidInputError("publish: nested multipart is not accepted")
        if part.name in ("manifest", "signed_manifest") and manifest is None:
            doc = parse_json_object(await _read_bounded(part, MAX_MANIFEST_BYTES), part.name)
            if part.name == "signed_manifest":
                signed = SignedManifest.from_dict(doc)
                manifest = signed.manifest
            else:
                manifest = Manifest.from_dict(doc)
            check(signed)
            continue
        if manifest is None:
            raise InvalidInputError("publish: the 'manifest' part must come first")
        name = check_name(part.filename, "uploaded file name")
        sizes = {f.name: f.size for f in manifest.files}
        if name not in sizes or name in received:
            raise InvalidInputError(f"publish: file {name!r} is not in the manifest, or sent twice")
        received.add(name)
        total += await _save_part(part, dest / name, sizes[name], limit - total)
    if manifest is None:
        raise InvalidInputError("publish: no 'manifest' part")
    return signed or manifest


async def _read_bounded(part: BodyPartReader, limit: int) -> bytes:
    data = bytearray()
    while block := await part.read_chunk(BLOCK):
        data += block
        if len(data) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(data))
    return bytes(data)


async def _save_part(part: BodyPartReader, path: Path, declared: int, room: int) -> int:
    """Stream one file part to ``path``; refuse it past its declared size or the room left."""
    written = 0
    with path.open("wb") as f:
        while block := await part.read_chunk(BLOCK):
            written += len(block)
            if written > room:
                raise web.HTTPRequestEntityTooLarge(max_size=room, actual_size=written)
            if written > declared:
                raise InvalidInputError(
                    f"publish: {path.name!r} is larger than the {declared} bytes in its manifest"
                )
            await asyncio.to_thread(f.write, block)
    return written
