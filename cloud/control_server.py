"""The control plane process: operator REST API + dashboard over registry and rollouts.

Handlers parse HTTP and map errors; decisions live in Registry and
RolloutController.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from cloud.fleet import FleetMonitor
from cloud.registry import Registry
from cloud.repair import RepairPolicy
from cloud.rollout import RolloutController
from common import topics
from common.device_token import issue_token
from common.errors import InvalidInputError
from common.json_object import parse_json_object
from common.manifest import Manifest
from common.mqtt import MqttLink, TlsConfig
from common.signing import Signer
from common.v2_server import error_middleware

logger = logging.getLogger(__name__)

REGISTRY = web.AppKey("registry", Registry)
ROLLOUTS = web.AppKey("rollouts", RolloutController)
SIGNER = web.AppKey("signer", Signer)
DASHBOARD = Path(__file__).with_name("static") / "dashboard.html"


@dataclass(frozen=True)
class ControlSettings:
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    chunk_size: int = 32 * 1024  # the smallest; big artifacts get bigger chunks
    public_url: str | None = None  # how agents reach this server over HTTP
    database: str | None = None  # a postgresql:// URL; default: control.sqlite in workdir
    repair: RepairPolicy = field(default_factory=RepairPolicy)  # limits on repair requests
    broker_username: str | None = None  # default: WORKDIR/broker-control.json if present
    broker_password: str | None = None
    broker_tls_ca: str | None = None  # CA file: connect to the broker with TLS

    @property
    def artifact_base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.workdir / "control.sqlite"

    @property
    def store_dir(self) -> Path:
        return self.workdir / "store"

    @property
    def key_path(self) -> Path:
        return self.workdir / "keys" / "signing.pem"


def build_control_app(settings: ControlSettings) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=512 * 1024 * 1024)
    app.cleanup_ctx.append(_resources(settings))
    app.add_routes(
        [
            web.get("/", dashboard),
            web.get("/api/health", health),
            web.get("/api/keys", keys),
            web.get("/api/devices", devices),
            web.post("/api/devices/{device_id}/token", device_token),
            web.get("/api/models", models),
            web.post("/api/models", publish),
            web.get("/api/models/{name}/versions/{version}", model_version),
            web.get("/api/artifacts/{digest}", artifact),
            web.post("/api/rollouts", start_rollout),
            web.get("/api/rollouts", rollouts),
            web.get("/api/rollouts/{id}", rollout),
            web.get("/api/events", events),
        ]
    )
    return app


def _resources(settings: ControlSettings):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings.workdir.mkdir(parents=True, exist_ok=True)
        signer = Signer.load_or_create(settings.key_path)
        registry = Registry(
            settings.database or settings.db_path,
            settings.store_dir,
            chunk_size=settings.chunk_size,
        )
        # NOTE: a persistent session under a stable client id: the broker keeps the
        # devices' events and chunk requests while the control plane restarts.
        link = MqttLink(
            client_id=f"fogline-control-{settings.port}",
            host=settings.broker_host,
            port=settings.broker_port,
            persistent_session=True,
            username=settings.broker_username,
            password=settings.broker_password,
            tls=TlsConfig(settings.broker_tls_ca) if settings.broker_tls_ca else None,
        )
        fleet = FleetMonitor(registry, link)
        rollouts = RolloutController(
            registry,
            fleet,
            signer,
            link,
            chunk_size=settings.chunk_size,
            artifact_base_url=settings.artifact_base_url,
            repair=settings.repair,
        )
        async with link, fleet, rollouts:
            app[REGISTRY], app[ROLLOUTS], app[SIGNER] = registry, rollouts, signer
            yield
        registry.close()

    return ctx


async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(DASHBOARD)


async def health(request: web.Request) -> web.Response:
    connected = request.app[ROLLOUTS].link.connected.is_set()
    return web.json_response({"status": "ok", "broker_connected": connected})


async def keys(request: web.Request) -> web.Response:
    signer = request.app[SIGNER]
    return web.json_response(
        {"keys": [{"key_id": signer.key_id, "public_key": signer.public_key_hex}]}
    )


async def devices(request: web.Request) -> web.Response:
    return web.json_response({"devices": request.app[REGISTRY].devices()})


async def device_token(request: web.Request) -> web.Response:
    """Enrollment, first part: a device's own token for the cloud fallback."""
    device_id = request.match_info["device_id"]
    try:
        topics.device_topic(device_id, "status")  # the same rule as every device id
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    token = issue_token(request.app[SIGNER], device_id)
    return web.json_response({"device_id": device_id, "token": token}, status=201)


async def models(request: web.Request) -> web.Response:
    records = await asyncio.to_thread(request.app[REGISTRY].versions)
    return web.json_response({"models": [r.summary() for r in records]})


async def model_version(request: web.Request) -> web.Response:
    variant = request.query.get("variant", "edge")
    record = request.app[REGISTRY].version(
        request.match_info["name"], request.match_info["version"], variant
    )
    return web.json_response({**record.summary(), "signed_manifest": record.signed.to_dict()})


async def publish(request: web.Request) -> web.Response:
    """Multipart upload: a ``manifest`` part (unsigned manifest JSON) and one part per file."""
    if not request.content_type.startswith("multipart/"):
        raise InvalidInputError("publish expects multipart/form-data: manifest + files")
    reader = await request.multipart()
    manifest: Manifest | None = None
    with tempfile.TemporaryDirectory(dir=request.app[REGISTRY].store_dir) as tmp:
        async for part in reader:
            if part.name == "manifest":
                manifest = Manifest.from_dict(parse_json_object(await part.text(), "manifest"))
            elif part.filename:
                name = Path(part.filename).name
                (Path(tmp) / name).write_bytes(await part.read())
        if manifest is None:
            raise InvalidInputError("publish: no 'manifest' part")
        record = await asyncio.to_thread(
            request.app[REGISTRY].publish, Path(tmp), manifest, request.app[SIGNER]
        )
    logger.info("published %s %s (%s)", manifest.name, manifest.version, manifest.variant)
    return web.json_response(record.summary(), status=201)


async def artifact(request: web.Request) -> web.FileResponse:
    """HTTP transport for artifacts; aiohttp's FileResponse honours Range for resume."""
    return web.FileResponse(request.app[REGISTRY].artifact_path(request.match_info["digest"]))


async def start_rollout(request: web.Request) -> web.Response:
    doc = parse_json_object(await request.read(), "rollout request")
    try:
        name, version = str(doc["model"]), str(doc["version"])
    except KeyError as exc:
        raise InvalidInputError(f"rollout needs {exc.args[0]!r}") from None
    targets = doc.get("devices")
    if targets is not None and not (
        isinstance(targets, list) and all(isinstance(d, str) for d in targets)
    ):
        raise InvalidInputError("'devices' must be a list of device ids")
    rollout_id = await request.app[ROLLOUTS].start(
        name, version, targets, allow_downgrade=bool(doc.get("allow_downgrade"))
    )
    return web.json_response({"id": rollout_id}, status=202)


async def rollouts(request: web.Request) -> web.Response:
    records = await asyncio.to_thread(request.app[REGISTRY].rollouts)
    return web.json_response({"rollouts": records})


async def rollout(request: web.Request) -> web.Response:
    return web.json_response(request.app[REGISTRY].rollout(request.match_info["id"]))


async def events(request: web.Request) -> web.Response:
    device = request.query.get("device")
    return web.json_response({"events": request.app[REGISTRY].events(device)})
