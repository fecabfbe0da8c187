"""The one client of the control plane's REST API (aiohttp), for the CLI, the demo and tests.

``ControlApi`` is the async client (``async with ControlApi(url, token=...) as api``);
``ControlClient`` is the same calls for synchronous code, one event loop per call.

NOTE: every way a call can fail (bad URL, refused port, timeout, an HTTP error
status with the server's ``{"error": ...}``) becomes a ``ControlError`` here, in
``ControlApi.request``, with one line that names the URL. Callers only map the
error to an exit code.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from common.errors import FoglineError, InvalidInputError
from common.manifest import MANIFEST_FILE, read_package, read_unsigned

DEFAULT_CONTROL = "http://127.0.0.1:8000"
CONTROL_ENV = "FOGLINE_CONTROL"
TOKEN_ENV = "FOGLINE_TOKEN"

T = TypeVar("T")


class ControlError(FoglineError, RuntimeError):
    """A call to the control plane failed; the message is one line naming the URL."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class ControlUnreachableError(ControlError, ConnectionError):
    """No HTTP answer at all: refused, unknown host, timeout, connection dropped."""


class ControlUrlError(InvalidInputError):
    """The control plane URL itself is malformed (the operator's input: exit 2)."""


def check_control_url(base_url: str) -> str:
    """``base_url`` without a trailing slash, or ControlUrlError naming it."""
    try:
        url = URL(base_url)
    except (ValueError, TypeError) as exc:
        raise ControlUrlError(f"bad control plane URL {base_url!r}: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ControlUrlError(
            f"bad control plane URL {base_url!r}: expected http(s)://HOST[:PORT], "
            f"e.g. {DEFAULT_CONTROL}"
        )
    return base_url.rstrip("/")


def _status_hint(status: int) -> str:
    if status == 401:
        return f" (give --token or set {TOKEN_ENV}; tokens: `fogline control token create`)"
    if status == 403:
        return " (this token's role does not allow it)"
    return ""


def _error_text(body: bytes) -> str:
    """The ``error`` of a JSON error body, else the body itself, on one line."""
    try:
        doc = json.loads(body)
        text = str(doc["error"]) if isinstance(doc, dict) and "error" in doc else body.decode()
    except (ValueError, UnicodeDecodeError):
        text = body.decode(errors="replace")
    return " ".join(text.split())[:500]


def _transport_error(method: str, url: str, exc: BaseException, timeout: float) -> ControlError:
    """The one-line error for a call that got no HTTP answer."""
    if isinstance(exc, TimeoutError):
        reason = f"no answer within {timeout:g}s"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        if isinstance(cause, ConnectionRefusedError):
            reason = "connection refused (is the control plane running there?)"
        else:
            reason = f"cannot connect: {cause.strerror or cause}"
    else:
        reason = " ".join(str(exc).split()) or type(exc).__name__
    return ControlUnreachableError(f"{method} {url}: {reason}", url=url)


class ControlApi:
    """``async with ControlApi(base_url, token=...) as api``: one session, many calls."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = check_control_url(base_url)
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControlApi:
        self._session = aiohttp.ClientSession(
            headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """The JSON answer, or ControlError with the URL."""
        raw = await self.request_bytes(method, path, body, headers)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ControlError(
                f"{method} {self.base_url + path}: answer is not JSON", url=path
            ) from exc

    async def request_bytes(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        """The answer's body, or ControlError with the URL: the one place errors are made."""
        assert self._session is not None, "use ControlApi as an async context manager"
        url = self.base_url + path
        try:
            async with self._session.request(method, url, data=body, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _transport_error(method, url, exc, self.timeout) from exc
        if status >= 400:
            message = f"{method} {url}: HTTP {status}: {_error_text(raw)}{_status_hint(status)}"
            raise ControlError(message, url=url, status=status)
        return raw

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def post_json(self, path: str, doc: dict[str, Any]) -> Any:
        body = json.dumps(doc).encode()
        return await self.request("POST", path, body, {"Content-Type": "application/json"})

    async def publish(self, package_dir: Path) -> dict[str, Any]:
        """Upload; a package signed offline (``manifest.json``) goes as ``signed_manifest``."""
        boundary = uuid.uuid4().hex
        body = await asyncio.to_thread(_multipart_package, package_dir, boundary)
        content_type = f"multipart/form-data; boundary={boundary}"
        return dict(await self.request("POST", "/api/models", body, {"Content-Type": content_type}))

    async def rollout(
        self,
        model: str,
        version: str,
        devices: list[str] | None = None,
        allow_downgrade: bool = False,
    ) -> str:
        doc: dict[str, Any] = {"model": model, "version": version}
        doc["allow_downgrade"] = allow_downgrade
        if devices:
            doc["devices"] = devices
        return str((await self.post_json("/api/rollouts", doc))["id"])

    async def wait_rollout(
        self,
        rollout_id: str,
        timeout: float,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the rollout leaves ``running`` or ``timeout`` passes; the last state."""
        deadline = time.monotonic() + timeout
        while True:
            state: dict[str, Any] = await self.get(f"/api/rollouts/{rollout_id}")
            if progress is not None:
                progress(state)
            if state["state"] != "running" or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.2)


def _multipart_package(package_dir: Path, boundary: str) -> bytes:
    if (package_dir / MANIFEST_FILE).is_file():
        signed = read_package(package_dir).to_dict()  # its files match it, or this raises
        manifest = signed["manifest"]
        parts = [_part(boundary, "signed_manifest", None, json.dumps(signed).encode())]
    else:
        manifest = read_unsigned(package_dir).to_dict()
        parts = [_part(boundary, "manifest", None, json.dumps(manifest).encode())]
    for f in manifest["files"]:
        parts.append(_part(boundary, f["name"], f["name"], (package_dir / f["name"]).read_bytes()))
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def _part(boundary: str, name: str, filename: str | None, data: bytes) -> bytes:
    disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
    head += "Content-Type: application/octet-stream\r\n\r\n"
    return head.encode() + data + b"\r\n"


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine from synchronous code, even when called inside a running loop
    (the demo calls the client from async code): then on a worker thread's own loop."""

    async def main() -> T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with ThreadPoolExecutor(1, thread_name_prefix="control-client") as pool:
        return pool.submit(asyncio.run, main()).result()


class ControlClient:
    """``ControlApi``'s calls for synchronous code (the demo, scripts, ``asyncio.to_thread``)."""

    def __init__(self, base_url: str, timeout: float = 30.0, *, token: str | None = None) -> None:
        self.base_url = check_control_url(base_url)
        self.timeout = timeout
        self._token = token

    def _call(self, fn: Callable[[ControlApi], Awaitable[T]]) -> T:
        async def call() -> T:
            async with ControlApi(self.base_url, token=self._token, timeout=self.timeout) as api:
                return await fn(api)

        return run_sync(call)

    def get(self, path: str) -> Any:
        return self._call(lambda api: api.get(path))

    def get_bytes(self, path: str) -> bytes:
        return self._call(lambda api: api.request_bytes("GET", path))

    def post_json(self, path: str, doc: dict[str, Any]) -> Any:
        return self._call(lambda api: api.post_json(path, doc))

    def publish(self, package_dir: Path) -> dict[str, Any]:
        return self._call(lambda api: api.publish(package_dir))

    def rollout(
        self,
        model: str,
        version: str,
        devices: list[str] | None = None,
        allow_downgrade: bool = False,
    ) -> str:
        return self._call(lambda api: api.rollout(model, version, devices, allow_downgrade))

    def wait_rollout(self, rollout_id: str, timeout: float, progress: Any = None) -> dict:
        return self._call(lambda api: api.wait_rollout(rollout_id, timeout, progress))
