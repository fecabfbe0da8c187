"""The fallback's read-only model cache, filled from the control plane over HTTP.

A cached package is verified (signature and digests) when it is loaded, like
any other package directory, so the cache itself is never trusted. A download
is verified too, and in the order that wastes nothing on a forgery: signature
first, then the bytes, bounded by the signed size.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from common.artifact_http import fetch_artifact
from common.errors import (
    AuthError,
    CloudUnavailableError,
    InvalidInputError,
    ModelNotFoundError,
    VerificationError,
)
from common.fsutil import write_durable
from common.json_object import load_json
from common.manifest import MANIFEST_FILE, SignedManifest, split_artifact, write_package
from common.names import check_digest, check_name, safe_join
from common.signing import TrustStore

logger = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 32 * 1024**2


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``NAME:VERSION`` as given on the command line."""
    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        raise InvalidInputError(f"model must be NAME:VERSION, got {ref!r}")
    return check_name(name, "model name"), check_name(version, "model version")


async def fetch_package(
    control_url: str,
    name: str,
    version: str,
    *,
    variant: str,
    cache_dir: Path,
    trust: TrustStore | None = None,
    token: str | None = None,
) -> Path:
    """The package directory for ``name`` ``version`` ``variant``, downloaded if not cached.

    NOTE: the manifest's signature is checked (against ``trust``) BEFORE a single
    artifact byte is fetched, and the download is bounded by the signed size; the
    server's unsigned figures only name the artifact, and must agree.
    """
    dest = safe_join(cache_dir, name, variant, version)
    if (dest / MANIFEST_FILE).is_file():
        return dest
    base = control_url.rstrip("/")
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=auth) as session:
        meta = await _get_json(
            session,
            f"{base}/api/models/{name}/versions/{version}",
            {"variant": variant},
            f"{name} {version} ({variant})",
        )
        signed, digest = _checked_meta(meta, (name, version, variant), trust)
        cache_dir.mkdir(parents=True, exist_ok=True)
        data = await fetch_artifact(
            session,
            f"{base}/api/artifacts/{digest}",
            size=signed.manifest.artifact_size,
            digest=digest,
            partial=cache_dir / f"{digest}.part",
        )
    files = split_artifact(data, signed.manifest)  # every file against the signed SHA-256
    tmp = cache_dir / f".incoming-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    for entry in signed.manifest.files:
        write_durable(tmp / entry.name, files[entry.name])
    write_package(tmp, signed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    (cache_dir / f"{digest}.part").unlink(missing_ok=True)
    logger.info("cached %s %s (%s) from %s", name, version, variant, base)
    return dest


def _checked_meta(
    meta: Any, wanted: tuple[str, str, str], trust: TrustStore | None
) -> tuple[SignedManifest, str]:
    """The signed manifest (verified) and the artifact id, from the server's answer.

    Refuses a manifest signed by an untrusted key, one for another model than asked
    (mix-and-match), a malformed artifact id, and an advertised size that is not the
    signed one.
    """
    try:
        signed = SignedManifest.from_dict(meta["signed_manifest"])
        artifact = meta["artifact"]
        digest = check_digest(artifact["digest"])
        advertised = artifact["size"]
    except (KeyError, TypeError) as exc:
        raise InvalidInputError(f"malformed model metadata from the control plane: {exc}") from None
    if trust is not None:
        signed.verify(trust)
    m = signed.manifest
    if (m.name, m.version, m.variant) != wanted:
        got = (m.name, m.version, m.variant)
        raise VerificationError(f"asked for {wanted}, got a signed manifest for {got}")
    if advertised != m.artifact_size:
        raise VerificationError(
            f"the server says the artifact is {advertised!r} bytes, the signed manifest "
            f"{m.artifact_size}"
        )
    return signed, digest


async def _get_json(
    session: aiohttp.ClientSession, url: str, params: dict[str, str], what: str
) -> Any:
    doc, _ = await _get_json_etag(session, url, params, what)
    return doc


async def _get_json_etag(
    session: aiohttp.ClientSession,
    url: str,
    params: dict[str, str],
    what: str,
    etag: str | None = None,
) -> tuple[Any, str | None]:
    """The JSON answer and its ETag; ``(None, etag)`` when unchanged since ``etag`` (304)."""
    headers = {"If-None-Match": etag} if etag else {}
    try:
        async with session.get(url, params=params, headers=headers) as resp:
            if resp.status == 304 and etag:
                return None, etag
            if resp.status == 404:
                raise ModelNotFoundError(what)
            if resp.status in (401, 403):
                raise AuthError(
                    f"the control plane refused the token (HTTP {resp.status}): give "
                    "--control-token or set FOGLINE_CONTROL_TOKEN (a viewer token is enough)"
                )
            if resp.status != 200:
                raise CloudUnavailableError(f"{url}: HTTP {resp.status}")
            body = await read_bounded(resp, url)
            new_etag = resp.headers.get("ETag")
    except aiohttp.ClientError as exc:
        raise CloudUnavailableError(f"cannot reach the control plane at {url}: {exc}") from exc
    try:  # bounded depth, finite numbers: a RecursionError would kill the key refresher
        return load_json(body, f"answer of {url}"), new_etag
    except InvalidInputError as exc:
        raise CloudUnavailableError(f"{url}: not a JSON answer: {exc}") from exc


async def read_bounded(
    resp: aiohttp.ClientResponse, url: str, limit: int = MAX_ANSWER_BYTES
) -> bytes:
    """The answer's body, refused past ``limit`` bytes (declared or as it arrives)."""
    too_big = f"{url}: answer over {limit} bytes"
    if resp.content_length is not None and resp.content_length > limit:
        raise CloudUnavailableError(too_big)
    body = bytearray()
    async for block in resp.content.iter_chunked(1 << 16):
        body += block
        if len(body) > limit:
            raise CloudUnavailableError(too_big)
    return bytes(body)


async def fetch_keyrings(control_url: str, token: str | None = None) -> list[Any]:
    """The control plane's signed keyring history (``GET /api/keys``), unverified:
    the caller applies it with ``common.keyring.apply_chain`` against keys it trusts."""
    url = f"{control_url.rstrip('/')}/api/keys"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        doc = await _get_json(session, url, {}, "keyring")
    chain = doc.get("keyrings") if isinstance(doc, dict) else None
    if not isinstance(chain, list):
        raise InvalidInputError(f"{url}: no 'keyrings' list in the answer")
    return chain


async def fetch_revocations(control_url: str, token: str | None = None) -> Any:
    """The control plane's signed list of revoked devices (``GET /api/device-revocations``),
    unverified: the caller offers it to a ``common.revocations.RevocationHolder``."""
    url = f"{control_url.rstrip('/')}/api/device-revocations"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        return await _get_json(session, url, {}, "device revocation list")


async def list_models(
    control_url: str, token: str | None = None, etag: str | None = None
) -> tuple[list[Any] | None, str | None]:
    """The control plane's published versions (``GET /api/models``: unsigned summaries,
    good for choosing what to fetch, never for trusting it) and the answer's ETag;
    ``(None, etag)`` while nothing changed since ``etag``."""
    url = f"{control_url.rstrip('/')}/api/models"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        doc, new_etag = await _get_json_etag(session, url, {}, "model list", etag)
    if doc is None:
        return None, new_etag
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list):
        raise CloudUnavailableError(f"{url}: no 'models' list in the answer")
    return models, new_etag


async def whoami(control_url: str, token: str) -> dict[str, Any]:
    """The name and role of an operator token, as the control plane sees it
    (``GET /api/whoami``); AuthError if it is unknown or revoked there."""
    url = f"{control_url.rstrip('/')}/api/whoami"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        try:
            doc = await _get_json(session, url, {}, "whoami")
        except AuthError:
            raise AuthError("invalid or revoked operator token") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("role"), str):
        raise CloudUnavailableError(f"{url}: no 'role' in the answer")
    return doc
