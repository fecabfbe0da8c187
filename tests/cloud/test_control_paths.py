"""Names from outside on every control-plane route and field, against a running plane.

Each hostile value is sent with a token that may call the route (so the name check
itself is what stops it): the answer is a 4xx JSON error, nothing is written
outside the store, nothing in the store changes, and neither the signing key nor
the database ever comes back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from common.device_token import issue_token
from tests.edge.agent_harness import ControlPlane
from tests.model_fixtures import make_package

# Hostile names: traversal, absolute, separators, NUL, overlong, unicode look-alikes.
BAD_NAMES = [
    "..",
    ".",
    "../../../../x",
    "../keys",
    "/etc/passwd",
    "/tmp/x",
    "a/b",
    "a\\b",
    "a\x00b",
    "x" * 65,
    "ｔｏｙ",  # fullwidth
    "tоy",  # Cyrillic o
    "toy\u200b",  # zero-width space
    "toy\n",
    " toy",
    "-rf",
    "~root",
    "C:x",
    "a+b",
    "%2e%2e",
]
SECRETS = (b"PRIVATE KEY", b"SQLite format 3")


def _attack_ids() -> list[str]:
    """The issue's attack: 64-character artifact ids that walk out to the key and the DB."""
    key = "./" * 21 + "../../keys/signing.pem"
    db = "./" * 22 + "../../control.sqlite"
    assert len(key) == len(db) == 64
    return [key, db, "../" * 21 + "a", "A" * 64, "g" * 64, "0" * 63, "0" * 65]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its SHA-256 (the database's own files aside)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and "control.sqlite" not in p.name
    }


async def _check(s: aiohttp.ClientSession, method: str, url: str | URL, **kw) -> None:
    async with s.request(method, url, **kw) as resp:
        body = await resp.read()
        assert resp.status in (400, 404), (method, str(url), resp.status, body[:200])
        assert not any(secret in body for secret in SECRETS), (method, url)
        if resp.status == 400:
            assert "error" in json.loads(body)


def _seg(value: str) -> str:
    """One path segment, every reserved byte escaped (``/`` as ``%2F``, NUL as ``%00``)."""
    return quote(value, safe="")


async def test_the_issue_attack_on_artifacts_is_refused(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        assert (tmp_path / "control" / "keys" / "signing.pem").is_file()
        device = {"Authorization": f"Bearer {issue_token(cp.signer, 'dev-1')}"}
        async with aiohttp.ClientSession() as s:
            for headers in (cp.auth("admin"), device):
                for ident in _attack_ids():
                    url = URL(f"{cp.url}/api/artifacts/{_seg(ident)}", encoded=True)
                    await _check(s, "GET", url, headers=headers)


async def test_hostile_names_on_every_route_and_field(mosquitto, tmp_path) -> None:
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        before = _snapshot(tmp_path)
        async with aiohttp.ClientSession(headers=cp.auth("admin")) as s:
            for bad in BAD_NAMES:
                seg = _seg(bad)
                for path in (
                    f"/api/models/{seg}/versions/1",
                    f"/api/models/toy/versions/{seg}",
                    f"/api/models/toy/versions/1?variant={seg}",
                    f"/api/rollouts/{seg}",
                    f"/api/events?device={seg}",
                ):
                    await _check(s, "GET", URL(cp.url + path, encoded=True))
                url = URL(f"{cp.url}/api/devices/{seg}/token", encoded=True)
                await _check(s, "POST", url)
                for body in (
                    {"model": bad, "version": "1", "devices": ["d1"]},
                    {"model": "toy", "version": bad, "devices": ["d1"]},
                    {"model": "toy", "version": "1", "devices": [bad]},
                    {"model": "toy", "version": "1", "devices": ["d1", 7]},
                ):
                    await _check(s, "POST", f"{cp.url}/api/rollouts", json=body)
        assert _snapshot(tmp_path) == before
        assert cp.registry.rollouts() == []
        assert cp.registry.events() == []


def _multipart(manifest: dict | bytes | None, files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "fogline-test-boundary"
    out = b""
    if manifest is not None:
        raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="manifest"\r\n\r\n'.encode()
        out += raw + b"\r\n"
    for name, data in files:
        disp = f'form-data; name="file"; filename="{name}"'.encode("utf-8", "surrogateescape")
        out += f"--{boundary}\r\nContent-Disposition: ".encode() + disp + b"\r\n\r\n"
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def upload(tmp_path):
    pkg = make_package(tmp_path / "upload", version="2", release=2)
    manifest = pkg.manifest.to_dict()
    files = [(f.name, (pkg.directory / f.name).read_bytes()) for f in pkg.manifest.files]
    return manifest, files


def _publish_attacks(manifest: dict, files: list[tuple[str, bytes]]):
    """(manifest, files) pairs that must each be refused."""
    for bad in BAD_NAMES:
        for field in ("name", "version", "variant", "parent"):
            yield {**manifest, field: bad}, files
        renamed = [{**manifest["files"][0], "name": bad}, *manifest["files"][1:]]
        yield {**manifest, "files": renamed}, [(bad, files[0][1]), *files[1:]]
        yield manifest, [(bad, files[0][1]), *files[1:]]  # the part's file name only
    yield manifest, [*files, ("extra.bin", b"x")]  # not in the manifest
    yield manifest, [files[0], files[0], *files[1:]]  # sent twice
    yield manifest, [(files[0][0], files[0][1] + b"more"), *files[1:]]  # longer than declared
    yield manifest, [(files[0][0], files[0][1][:-1]), *files[1:]]  # shorter
    yield manifest, [(files[0][0], bytes([files[0][1][0] ^ 1]) + files[0][1][1:]), *files[1:]]
    yield manifest, files[:1]  # a file missing
    yield {**manifest, "files": [{**manifest["files"][0], "name": "manifest.json"}]}, files
    yield None, files  # no manifest
    yield b"[1, 2]", files
    yield b"{" * 100, files


async def test_hostile_publish_uploads_are_refused(mosquitto, tmp_path, upload) -> None:
    manifest, files = upload
    async with ControlPlane(tmp_path / "control", mosquitto) as cp:
        cp.publish_toy(tmp_path, "1")
        before = _snapshot(tmp_path)
        async with aiohttp.ClientSession(headers=cp.auth("operator")) as s:
            for doc, parts in _publish_attacks(manifest, files):
                body, ctype = _multipart(doc, parts)
                await _check(
                    s, "POST", f"{cp.url}/api/models", data=body, headers={"Content-Type": ctype}
                )
            # Files before the manifest: refused too (names checked against it first).
            body, ctype = _multipart(None, files)
            body = body.replace(b"--fogline-test-boundary--\r\n", b"") + _multipart(manifest, [])[0]
            await _check(
                s, "POST", f"{cp.url}/api/models", data=body, headers={"Content-Type": ctype}
            )
            # The honest upload still works, and changes only the store.
            body, ctype = _multipart(manifest, files)
            async with s.post(
                f"{cp.url}/api/models", data=body, headers={"Content-Type": ctype}
            ) as resp:
                assert resp.status == 201, await resp.text()
        after = _snapshot(tmp_path)
        assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten
        assert all(k.startswith("control/store/") for k in set(after) - set(before))
        assert [m.manifest.version for m in cp.registry.versions()] == ["1", "2"]


async def test_bodies_are_bounded_per_route(mosquitto, tmp_path, upload) -> None:
    manifest, files = upload
    async with ControlPlane(tmp_path / "control", mosquitto, max_upload_bytes=2048) as cp:
        async with aiohttp.ClientSession(headers=cp.auth("operator")) as s:
            body, ctype = _multipart(manifest, files)
            assert len(body) > 2048
            async with s.post(
                f"{cp.url}/api/models", data=body, headers={"Content-Type": ctype}
            ) as resp:
                assert resp.status == 413 and "error" in await resp.json()

            async def chunked():  # no Content-Length: the stream itself is counted
                for i in range(0, len(body), 1000):
                    yield body[i : i + 1000]

            async with s.post(
                f"{cp.url}/api/models", data=chunked(), headers={"Content-Type": ctype}
            ) as resp:
                assert resp.status == 413
            big = {"model": "toy", "version": "1", "devices": ["d" * 60] * 20_000}  # > 1 MiB
            async with s.post(f"{cp.url}/api/rollouts", json=big) as resp:
                assert resp.status == 413
        assert cp.registry.versions() == []
        assert not list((tmp_path / "control" / "store").glob("tmp*"))  # no upload left behind
