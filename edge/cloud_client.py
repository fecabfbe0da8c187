"""The cloud fallback seen from the edge: a Runtime that calls a remote V2 server.

Error mapping, so the router can decide without knowing HTTP:
- cannot connect, connection dropped → ``CloudConnectError`` (worth one retry)
- timeout, 5xx, a malformed answer, or a 4xx that says the *link* is wrong
  (401/403 credentials, 404 model not served there, 408, 429)
  → ``CloudUnavailableError``
- 413 → ``CloudTooLargeError``: the request is fine but bigger than the cloud
  takes, so the router answers locally (marked degraded) instead of failing it
- any other 4xx → ``InvalidInputError`` with the server's error text: the
  request itself is bad, and asking again elsewhere will not help.

Requests go out in the V2 binary tensor extension (raw tensor bytes after a
JSON header; about 5x smaller than JSON numbers) and answers come back the
same way; large ones are encoded and decoded in a worker thread, never on the
event loop (a 12 MiB request once stalled it for 4.3 s as JSON).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp

from common import tracing
from common.errors import CloudUnavailableError, InvalidInputError, PayloadTooLargeError
from common.inference import InferRequest, InferResponse
from common.json_object import load_json
from common.manifest import TensorSpec
from common.runtime import ModelInfo
from common.v2_binary import BINARY_HEADER, decode_infer_response, encode_infer_request

logger = logging.getLogger(__name__)

# 4xx answers that describe the link to the cloud, not the caller's request.
_LINK_STATUSES = frozenset({401, 403, 404, 408, 429})


_OFFLOAD_BYTES = 1 << 16  # encode/decode bodies larger than this in a worker thread
_T = TypeVar("_T")


class CloudConnectError(CloudUnavailableError):
    """The cloud could not be reached at all (refused, reset): a retry may succeed."""


class CloudTooLargeError(PayloadTooLargeError):
    """The cloud refused the request for its size (413); the request itself is valid."""


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
        size = sum(t.data.nbytes for t in request.inputs)
        body, header_length = await _offload(size, encode_infer_request, request)
        headers = {BINARY_HEADER: str(header_length), "Content-Type": "application/octet-stream"}
        status, payload, answer_headers = await self._request("POST", self.infer_url, body, headers)
        del body
        if status >= 400:
            raise _status_error(status, payload, self.infer_url)
        try:
            response = await _offload(
                len(payload), decode_infer_response, payload, _header_length(answer_headers)
            )
        except InvalidInputError as exc:
            raise CloudUnavailableError(f"cloud sent a malformed answer: {exc}") from exc
        if response.version and response.version != self._info.version:
            self._info = ModelInfo(self.model, response.version, self.platform, [], [])
        return response

    async def metadata(self) -> ModelInfo:
        """Ask the cloud for the model's V2 metadata and remember it as ``info``."""
        url = f"{self.base_url}/v2/models/{quote(self.model, safe='')}"
        status, payload, _ = await self._request("GET", url, None)
        if status >= 400:
            raise _status_error(status, payload, url)
        try:
            doc = load_json(payload, "cloud metadata")
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

    async def _request(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, Mapping[str, str]]:
        if self._session is None:
            raise CloudUnavailableError("cloud client is not loaded")
        headers = {**self._headers, **(headers or {})}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        attributes = {"http.request.method": method, "url.full": url}
        try:
            with tracing.span(f"{method} fallback", kind="client", attributes=attributes):
                tracing.inject(headers)  # traceparent: the fallback's spans join this trace
                async with self._session.request(
                    method, url, data=body, headers=headers, timeout=timeout
                ) as resp:
                    tracing.annotate({"http.response.status_code": resp.status})
                    return resp.status, await resp.read(), resp.headers.copy()
        except TimeoutError as exc:  # before ClientConnectionError: some timeouts are both
            raise CloudUnavailableError(f"cloud {url} timed out after {self.timeout_s}s") from exc
        except aiohttp.ClientConnectionError as exc:
            raise CloudConnectError(f"cannot reach cloud {url}: {exc!r}") from exc
        except aiohttp.ClientError as exc:
            raise CloudUnavailableError(f"cloud {url} failed: {exc!r}") from exc


async def _offload(size: int, fn: Callable[..., _T], *args: Any) -> _T:
    """Run a codec function inline when small, in a worker thread when large."""
    if size > _OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _header_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get(BINARY_HEADER)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise InvalidInputError(f"{BINARY_HEADER} is not a byte count: {value!r}")
    return int(value)


def _status_error(status: int, payload: bytes, url: str) -> Exception:
    message = _error_text(payload)
    if status == 413:
        return CloudTooLargeError(f"cloud refused the request for its size: {message}")
    if status >= 500 or status in _LINK_STATUSES:
        logger.debug("cloud %s answered %d: %s", url, status, message)
        return CloudUnavailableError(f"cloud answered {status}: {message}")
    return InvalidInputError(f"cloud refused the request ({status}): {message}")


def _error_text(payload: bytes) -> str:
    try:
        doc: Any = load_json(payload, "cloud error")  # bounded depth: the cloud is not trusted
    except InvalidInputError:
        return payload[:200].decode(errors="replace")
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return doc["error"]
    return str(doc)[:200]
