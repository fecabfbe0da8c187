"""The cloud fallback seen from the edge: a Runtime that calls a remote V2 server.

Error mapping, so the router can decide without knowing HTTP:
- cannot connect, connection dropped → ``CloudConnectError`` (worth one retry)
- timeout, 5xx, a malformed answer, or a 4xx that says the *link* is wrong
  (401/403 credentials, 404 model not served there, 408, 429)
  → ``CloudUnavailableError``
- any other 4xx → ``InvalidInputError`` with the server's error text: the
  request itself is bad, and asking again elsewhere will not help.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

import aiohttp

from common.errors import CloudUnavailableError, InvalidInputError
from common.inference import InferRequest, InferResponse, request_to_rest, response_from_rest
from common.manifest import TensorSpec
from common.runtime import ModelInfo

logger = logging.getLogger(__name__)

# 4xx answers that describe the link to the cloud, not the caller's request.
_LINK_STATUSES = frozenset({401, 403, 404, 408, 429})


class CloudConnectError(CloudUnavailableError):
    """The cloud could not be reached at all (refused, reset): a retry may succeed."""


class CloudClient:
    """Runtime for one model served by a remote V2 endpoint (the Fogline fallback)."""

    platform = "fogline_remote"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        token: str | None = None,
        timeout_s: float = 2.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = session
        self._owns_session = session is None
        self._info = ModelInfo(model, "", self.platform, [], [])

    @property
    def info(self) -> ModelInfo:
        """What the cloud last said about the model (its version after the first answer)."""
        return self._info

    @property
    def ready(self) -> bool:
        """Configured and loaded; whether the cloud is up is known only by asking."""
        return self._session is not None and not self._session.closed

    @property
    def infer_url(self) -> str:
        return f"{self.base_url}/v2/models/{quote(self.model, safe='')}/infer"

    async def load(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True

    async def unload(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def infer(self, request: InferRequest) -> InferResponse:
        body = json.dumps(request_to_rest(request)).encode()
        status, payload = await self._request("POST", self.infer_url, body)
        if status >= 400:
            raise _status_error(status, payload, self.infer_url)
        try:
            response = response_from_rest(payload)
        except InvalidInputError as exc:
            raise CloudUnavailableError(f"cloud sent a malformed answer: {exc}") from exc
        if response.version and response.version != self._info.version:
            self._info = ModelInfo(self.model, response.version, self.platform, [], [])
        return response

    async def metadata(self) -> ModelInfo:
        """Ask the cloud for the model's V2 metadata and remember it as ``info``."""
        url = f"{self.base_url}/v2/models/{quote(self.model, safe='')}"
        status, payload = await self._request("GET", url, None)
        if status >= 400:
            raise _status_error(status, payload, url)
        try:
            doc = json.loads(payload)
            self._info = ModelInfo(
                name=self.model,
                version=str(doc["versions"][-1]),
                platform=self.platform,
                inputs=[TensorSpec(t["name"], t["datatype"], t["shape"]) for t in doc["inputs"]],
                outputs=[TensorSpec(t["name"], t["datatype"], t["shape"]) for t in doc["outputs"]],
            )
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise CloudUnavailableError(f"cloud sent malformed metadata: {exc!r}") from exc
        return self._info

    async def _request(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        if self._session is None:
            raise CloudUnavailableError("cloud client is not loaded")
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self._session.request(
                method, url, data=body, headers=headers, timeout=timeout
            ) as resp:
                return resp.status, await resp.read()
        except TimeoutError as exc:  # before ClientConnectionError: some timeouts are both
            raise CloudUnavailableError(f"cloud {url} timed out after {self.timeout_s}s") from exc
        except aiohttp.ClientConnectionError as exc:
            raise CloudConnectError(f"cannot reach cloud {url}: {exc!r}") from exc
        except aiohttp.ClientError as exc:
            raise CloudUnavailableError(f"cloud {url} failed: {exc!r}") from exc


def _status_error(status: int, payload: bytes, url: str) -> Exception:
    message = _error_text(payload)
    if status >= 500 or status in _LINK_STATUSES:
        logger.debug("cloud %s answered %d: %s", url, status, message)
        return CloudUnavailableError(f"cloud answered {status}: {message}")
    return InvalidInputError(f"cloud refused the request ({status}): {message}")


def _error_text(payload: bytes) -> str:
    try:
        doc: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return payload[:200].decode(errors="replace")
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return doc["error"]
    return str(doc)[:200]
