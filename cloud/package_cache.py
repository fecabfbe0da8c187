"""The fallback's read-only model cache, filled from the control plane over HTTP.

A cached package is verified (signature and digests) when it is loaded, like
any other package directory, so the cache itself is never trusted.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from common.artifact_http import fetch_artifact
from common.errors import CloudUnavailableError, InvalidInputError, ModelNotFoundError
from common.fsutil import write_durable
from common.manifest import MANIFEST_FILE, SignedManifest, split_artifact, write_package

logger = logging.getLogger(__name__)


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``NAME:VERSION`` as given on the command line."""
    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        raise InvalidInputError(f"model must be NAME:VERSION, got {ref!r}")
    return name, version


async def fetch_package(
    control_url: str, name: str, version: str, *, variant: str, cache_dir: Path
) -> Path:
    """The package directory for ``name`` ``version`` ``variant``, downloaded if not cached."""
    dest = cache_dir / name / variant / version
    if (dest / MANIFEST_FILE).is_file():
        return dest
    base = control_url.rstrip("/")
    async with aiohttp.ClientSession() as session:
        meta = await _get_json(
            session,
            f"{base}/api/models/{name}/versions/{version}",
            {"variant": variant},
            f"{name} {version} ({variant})",
        )
        signed = SignedManifest.from_dict(meta["signed_manifest"])
        artifact = meta["artifact"]
        cache_dir.mkdir(parents=True, exist_ok=True)
        data = await fetch_artifact(
            session,
            f"{base}/api/artifacts/{artifact['digest']}",
            size=int(artifact["size"]),
            digest=str(artifact["digest"]),
            partial=cache_dir / f"{artifact['digest']}.part",
        )
    files = split_artifact(data, signed.manifest)
    tmp = cache_dir / f".incoming-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    for entry in signed.manifest.files:
        write_durable(tmp / entry.name, files[entry.name])
    write_package(tmp, signed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    (cache_dir / f"{artifact['digest']}.part").unlink(missing_ok=True)
    logger.info("cached %s %s (%s) from %s", name, version, variant, base)
    return dest


async def _get_json(
    session: aiohttp.ClientSession, url: str, params: dict[str, str], what: str
) -> Any:
    try:
        async with session.get(url, params=params) as resp:
            if resp.status == 404:
                raise ModelNotFoundError(what)
            if resp.status != 200:
                raise CloudUnavailableError(f"{url}: HTTP {resp.status}")
            return await resp.json()
    except aiohttp.ClientError as exc:
        raise CloudUnavailableError(f"cannot reach the control plane at {url}: {exc}") from exc


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
