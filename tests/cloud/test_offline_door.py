"""``--require-offline-signature`` with a stolen operator token: refused at the manifest.

Red team: the upload's signature was checked only after every file part had
been streamed to the control plane's disk, so a stolen operator token (which
cannot ship a model here) could still make the control plane take in up to
``--max-upload-bytes`` (2 GiB) per request before the 403.
"""

from __future__ import annotations

import asyncio
import json

from common.manifest import SignedManifest
from common.signing import Signer
from tests.edge.agent_harness import ControlPlane
from tests.model_fixtures import make_package

BOUNDARY = "fogline-offline-door"
FILE_BYTES = 64 * 1024**2


async def _upload(cp: ControlPlane, part: str, doc: dict, file_name: str) -> tuple[bytes, int]:
    """Send the manifest part, then file bytes until the server answers: (status line, sent)."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{part}"\r\n\r\n'
        + json.dumps(doc)
        + f"\r\n--{BOUNDARY}\r\n"
        + f'Content-Disposition: form-data; name="file"; filename="{file_name}"\r\n\r\n'
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    request = (
        f"POST /api/models HTTP/1.1\r\nHost: x\r\n{_auth(cp)}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(head) + FILE_BYTES + len(tail)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", cp.settings.port)
    try:
        writer.write(request + head)
        sent, block = 0, b"\0" * (1 << 20)
        while sent < FILE_BYTES:
            try:
                status = await asyncio.wait_for(reader.readline(), 0.02)
            except TimeoutError:
                writer.write(block)
                await writer.drain()
                sent += len(block)
                continue
            return status, sent
        writer.write(tail)
        return await reader.readline(), sent
    finally:
        writer.close()


def _auth(cp: ControlPlane) -> str:
    return f"Authorization: Bearer {cp.tokens['operator']}"


async def test_an_upload_without_a_release_signature_is_refused_before_its_files(
    mosquitto, tmp_path
) -> None:
    pkg = make_package(tmp_path / "pkg", version="2", release=2)
    # A manifest that claims a huge model file, unsigned and signed by an unknown key.
    files = [
        {**f, "size": FILE_BYTES} if f["role"] == "model" else f
        for f in pkg.manifest.to_dict()["files"]
    ]
    unsigned = {**pkg.manifest.to_dict(), "files": files}
    forged = SignedManifest.sign(pkg.manifest, Signer.generate()).to_dict()
    forged["manifest"]["files"] = files
    model = next(f["name"] for f in files if f["role"] == "model")
    async with ControlPlane(tmp_path / "control", mosquitto, require_offline_signature=True) as cp:
        for part, doc in (("manifest", unsigned), ("signed_manifest", forged)):
            status, sent = await _upload(cp, part, doc, model)
            assert b" 403 " in status, (part, status)
            assert sent < FILE_BYTES // 2, (part, sent)
