"""The second artifact transport: HTTP GET with Range resume.

The size and digest come from signed metadata, never from the server: the
transfer stops at that size (the "endless data" attack) and the bytes must
hash to the digest, else the partial file is dropped and fetched again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import aiohttp

from common.errors import CloudUnavailableError, VerificationError

logger = logging.getLogger(__name__)

BLOCK = 1 << 16


async def fetch_artifact(
    session: aiohttp.ClientSession,
    url: str,
    *,
    size: int,
    digest: str,
    partial: Path,
    attempts: int = 3,
    timeout_s: float = 60.0,
    token: str | None = None,
) -> bytes:
    """Download into ``partial`` (resuming what is there) and return the checked bytes.

    ``token`` goes out as ``Authorization: Bearer``: a device token from an agent,
    an operator token from the fallback.
    """
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    last_error: Exception | None = None
    for _ in range(attempts):
        try:
            await _fill(session, url, size, partial, timeout_s, auth)
        except (aiohttp.ClientError, TimeoutError) as exc:
            last_error = exc  # keep what arrived; the next attempt resumes from there
            logger.info("artifact download from %s interrupted: %s", url, exc)
            continue
        data = await asyncio.to_thread(partial.read_bytes)
        if len(data) == size and hashlib.sha256(data).hexdigest() == digest:
            return data
        partial.unlink()
        last_error = VerificationError(f"artifact from {url} does not match its digest")
    if isinstance(last_error, VerificationError):
        raise last_error
    raise CloudUnavailableError(f"cannot download {url}: {last_error}") from last_error


async def _fill(
    session: aiohttp.ClientSession,
    url: str,
    size: int,
    partial: Path,
    timeout_s: float,
    auth: dict[str, str],
) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        partial.unlink()
        have = 0
    if have == size:
        return
    headers = {**auth, "Range": f"bytes={have}-"} if have else dict(auth)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.get(url, headers=headers, timeout=timeout) as resp:
        if resp.status == 200:
            have = 0  # the server sent it all (no Range support): start over
        elif resp.status != 206:
            raise aiohttp.ClientResponseError(
                resp.request_info, resp.history, status=resp.status, message=resp.reason or ""
            )
        with partial.open("ab" if have else "wb") as f:
            async for block in resp.content.iter_chunked(BLOCK):
                block = block[: size - have]  # never more than the signed size
                f.write(block)
                have += len(block)
                if have >= size:
                    break
