"""The control plane process: operator REST API + dashboard over registry and rollouts.

Handlers parse HTTP and map errors; decisions live in Registry and
RolloutController. Every route but health (and the dashboard's static page)
needs a bearer token; the route table below says which role each one needs
(``/metrics`` too: it counts devices and rollouts; Prometheus sends a ``metrics``-role
token, which can read nothing else).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from cloud import dashboard, device_api, hard_examples, keys_api, staged_api
from cloud.audit_log import check_reason
from cloud.control_auth import (
    CALLER,
    DEVICE,
    DEVICE_OR_VIEWER,
    OPERATORS,
    REVOKED,
    TRUST,
    UPLOAD_LIMIT,
    guarded,
    receive_package,
)
from cloud.control_metrics import CONTROL_METRICS, ControlMetrics, latency_middleware, metrics
from cloud.enrollment import RevokedDevices, load_enrollments
from cloud.fallback_metrics import FallbackScraper
from cloud.fleet import FleetMonitor
from cloud.key_rollout import KeyService
from cloud.keys import KeyStore
from cloud.keys_api import KEYS
from cloud.operator_tokens import ADMIN, METRICS_READER, OPERATOR, VIEWER, Operator
from cloud.registry import Registry
from cloud.repair import RepairPolicy
from cloud.rollout import RolloutController
from cloud.serving_history import ServingHistory
from cloud.staged_api import STAGED
from cloud.staged_rollout import StagedRollouts
from common.device_token import issue_token
from common.errors import InvalidInputError
from common.json_object import parse_json_object
from common.manifest import SignedManifest
from common.mqtt import MqttLink, TlsConfig
from common.names import check_name
from common.revocations import sign_revocations
from common.signing import Signer
from common.v2_server import error_middleware

logger = logging.getLogger(__name__)

REGISTRY = web.AppKey("registry", Registry)
ROLLOUTS = web.AppKey("rollouts", RolloutController)


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
    # A stable MQTT client id makes a persistent session (the broker keeps events and
    # chunk requests across a restart). Unset: the broker login if there is one (the
    # generated broker config binds ids to logins), else a per-process random id and
    # a clean session, so a device cannot guess the id and take the control plane's place.
    mqtt_client_id: str | None = None
    max_upload_bytes: int = 2 * 1024**3  # a published package, all files together
    max_body_bytes: int = 1024**2  # every other request body
    telemetry_interval_s: float = 1.0  # at most one report per device per interval
    broker_username: str | None = None  # default: WORKDIR/broker-control.json if present
    broker_password: str | None = None
    broker_tls_ca: str | None = None  # CA file: connect to the broker with TLS
    require_offline_signature: bool = False  # refuse uploads not signed by a release key
    # Replicas on one PostgreSQL name one group: the broker hands each device event to
    # one of them ($share/GROUP/...); None: this process alone subscribes to everything.
    share_group: str | None = None
    lease_s: float = 15.0  # a staged rollout's driver lease; a crashed replica's expires
    resend_after_s: float = 5.0  # first resend of a command no device answered
    fallback_metrics_urls: tuple[str, ...] = ()  # fallbacks whose /metrics the dashboard shows
    stale_after_s: float = 10.0  # an online device silent this long is flagged stale

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
    app = web.Application(
        middlewares=[latency_middleware, error_middleware],  # times the answer as sent
        client_max_size=settings.max_body_bytes,
    )
    app[CONTROL_METRICS] = ControlMetrics()
    app[UPLOAD_LIMIT] = settings.max_upload_bytes
    app.cleanup_ctx.append(_resources(settings))
    # (method, path, handler, who may call it: None is public)
    table = [
        ("GET", "/", dashboard.page, None),  # static HTML; its data calls carry a token
        ("GET", "/static/{file}", dashboard.static_file, None),  # vendored, from a fixed table
        ("GET", "/api/health", health, None),
        *keys_api.ROUTES,
        ("GET", "/api/whoami", whoami, VIEWER),
        ("GET", "/api/devices", devices, VIEWER),
        ("POST", "/api/devices/{device_id}/token", device_token, ADMIN),
        ("GET", "/api/device-revocations", device_revocations, VIEWER),
        ("GET", "/api/models", models, VIEWER),
        ("POST", "/api/models", publish, OPERATOR),
        ("GET", "/api/models/{name}/versions/{version}", model_version, VIEWER),
        ("GET", "/api/models/{name}", model_detail, VIEWER),
        ("GET", "/api/models/{name}/lineage", model_lineage, VIEWER),
        ("GET", "/api/artifacts/{digest}", artifact, DEVICE_OR_VIEWER),
        ("POST", "/api/rollouts", start_rollout, OPERATOR),
        ("GET", "/api/rollouts", rollouts, VIEWER),
        ("GET", "/api/rollouts/{id}", rollout, VIEWER),
        ("POST", "/api/rollouts/{id}/abort", abort_rollout, OPERATOR),
        ("GET", "/api/events", events, VIEWER),
        ("GET", "/api/dashboard/fleet", dashboard.fleet, VIEWER),
        ("GET", "/api/dashboard/serving", dashboard.serving, VIEWER),
        ("GET", "/api/hard-examples", hard_examples.listing, VIEWER),
        ("POST", "/api/hard-examples/{name}", hard_examples.upload, DEVICE),
        ("GET", "/api/hard-examples/{name}", hard_examples.download, VIEWER),
        ("GET", "/metrics", metrics, METRICS_READER),  # a scrape-only token will do
        *staged_api.ROUTES,
        *device_api.ROUTES,
    ]
    app.add_routes([web.route(m, p, guarded(h, role)) for m, p, h, role in table])
    return app


def _resources(settings: ControlSettings):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings.workdir.mkdir(parents=True, exist_ok=True)
        keystore = KeyStore(settings.workdir)  # keys/: never under store/, which is served
        lock = keystore.hold()  # NOTE: held while this runs; the CLI changes keys offline only
        signer = keystore.open_or_create()
        group = broker_share_group(settings.share_group, signer)
        registry = Registry(
            settings.database or settings.db_path,
            settings.store_dir,
            chunk_size=settings.chunk_size,
        )
        await _warn_without_tokens(registry, settings.workdir)
        link = _mqtt_link(settings)
        app[CONTROL_METRICS].watch(registry, link)
        history = ServingHistory()
        revoked = RevokedDevices(settings.workdir, registry.revocations)
        fleet = FleetMonitor(
            registry,
            link,
            telemetry_interval_s=settings.telemetry_interval_s,
            history=history,
            share_group=group,
            gone=revoked.gone,
        )
        scraper = FallbackScraper(list(settings.fallback_metrics_urls))
        rollouts = RolloutController(
            registry,
            fleet,
            signer,
            link,
            chunk_size=settings.chunk_size,
            artifact_base_url=settings.artifact_base_url,
            repair=settings.repair,
            enrolled=lambda: load_enrollments(settings.workdir).keys(),
            resend_after_s=settings.resend_after_s,
            share_group=group,
        )
        staged = StagedRollouts(
            registry,
            rollouts,
            labels=lambda: {d: e.labels for d, e in load_enrollments(settings.workdir).items()},
            lease_s=settings.lease_s,
        )
        keys = KeyService(
            keystore, registry, link, rollouts, require_offline=settings.require_offline_signature
        )
        async with link, fleet, rollouts, keys, staged, scraper.running():
            app[REGISTRY], app[ROLLOUTS], app[KEYS] = registry, rollouts, keys
            app[STAGED] = staged
            app[device_api.COMMANDS] = device_api.DeviceCommands(
                registry, rollouts, enrolled=lambda: load_enrollments(settings.workdir).keys()
            )
            app[hard_examples.HARD_EXAMPLES] = hard_examples.HardExampleStore(
                settings.workdir / "hard-examples", registry
            )
            app[dashboard.SOURCES] = dashboard.Sources(
                registry, history, scraper, settings.stale_after_s
            )
            app[OPERATORS] = registry.operators
            app[TRUST] = keys.trust  # verifies device tokens; kept current after key changes
            app[REVOKED] = revoked
            yield
        registry.close()
        lock.close()

    return ctx


def broker_share_group(name: str | None, signer: Signer) -> str | None:
    """The group replicas named ``name`` subscribe in: ``name`` and a tag only the
    signing key (which every replica holds, and no device) can make.

    NOTE: red team: Mosquitto grants any ``$share/GROUP/...`` subscription and checks
    the ACL only on delivery, so a device's login that joined the replicas' group took
    its turn in the broker's round robin and every message handed to it was dropped:
    half of all events, telemetry and chunk requests lost. A device cannot join a group
    whose name it cannot make. (A rotated key names a new group; replicas restarted on
    different keys each take every message, stored once, rather than losing any.)
    """
    if name is None:
        return None
    check_name(name, "share group")
    doc = {"purpose": "fogline broker share group", "group": name}
    tag = hashlib.sha256(bytes.fromhex(signer.sign(doc))).hexdigest()[:24]
    return f"{name[:39]}-{tag}"


def _mqtt_link(settings: ControlSettings) -> MqttLink:
    """The control plane's broker link.

    NOTE: only a configured (secret, ACL-protected) name gets a persistent session;
    a guessable stable id would let any client take the session and its messages.
    With a broker login, the id is the login: a broker from `fogline broker config`
    forces client id = username, so only the holder of the password can take it.
    """
    stable = settings.mqtt_client_id or settings.broker_username
    return MqttLink(
        client_id=stable or f"fogline-control-{secrets.token_hex(8)}",
        host=settings.broker_host,
        port=settings.broker_port,
        persistent_session=stable is not None,
        username=settings.broker_username,
        password=settings.broker_password,
        tls=TlsConfig(settings.broker_tls_ca) if settings.broker_tls_ca else None,
    )


async def _warn_without_tokens(registry: Registry, workdir: Path) -> None:
    if not await asyncio.to_thread(registry.operators.list):
        logger.warning(
            "no operator tokens yet: every route but /api/health answers 401; make one "
            "with `fogline control token create NAME --role admin --workdir %s`",
            workdir,
        )


async def health(request: web.Request) -> web.Response:
    connected = request.app[ROLLOUTS].link.connected.is_set()
    return web.json_response({"status": "ok", "broker_connected": connected})


async def whoami(request: web.Request) -> web.Response:
    """The caller's token name and role: how a fallback checks an operator token it got."""
    caller = request[CALLER]
    assert isinstance(caller, Operator)  # the route takes operator tokens only
    return web.json_response({"name": caller.name, "role": caller.role})


async def devices(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    # NOTE: query and JSON in a worker thread: for a thousand devices that is tens of
    # milliseconds the event loop (and /api/health, and MQTT dispatch) would stand still.
    body = await asyncio.to_thread(registry.devices_json)
    return web.Response(text=body, content_type="application/json")


async def device_token(request: web.Request) -> web.Response:
    """Enrollment, first part: a device's own token for the cloud fallback."""
    device_id = check_name(request.match_info["device_id"], "device id")
    token = issue_token(request.app[KEYS].signer, device_id)
    return web.json_response({"device_id": device_id, "token": token}, status=201)


async def device_revocations(request: web.Request) -> web.Response:
    """The revoked devices, signed now by the active control key (a fallback follows it
    with its keyrings and refuses those devices' tokens)."""
    revoked = await asyncio.to_thread(request.app[REVOKED].current)
    return web.json_response(sign_revocations(request.app[KEYS].signer, revoked))


async def models(request: web.Request) -> web.Response:
    """Every published version. With an ETag, so pollers (fallback replicas) that send
    ``If-None-Match`` get a bodiless 304 while nothing was published."""
    records = await asyncio.to_thread(request.app[REGISTRY].versions)
    body = json.dumps({"models": [r.summary() for r in records]}).encode()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers={"ETag": etag})
    return web.Response(body=body, content_type="application/json", headers={"ETag": etag})


async def model_version(request: web.Request) -> web.Response:
    variant = request.query.get("variant", "edge")
    record = request.app[REGISTRY].version(
        request.match_info["name"], request.match_info["version"], variant
    )
    return web.json_response({**record.summary(), "signed_manifest": record.signed.to_dict()})


async def model_detail(request: web.Request) -> web.Response:
    """Every variant of every version of one model (``?version=V``: of that version), and
    the TensorRT engine packages beside their ONNX packages."""
    name, version = request.match_info["name"], request.query.get("version")
    registry = request.app[REGISTRY]
    records = await asyncio.to_thread(registry.model_versions, name, version)
    engines = await asyncio.to_thread(registry.engines, name, version)
    return web.json_response(
        {"name": name, "versions": [r.summary() for r in records], "engines": engines}
    )


async def model_lineage(request: web.Request) -> web.Response:
    """The ancestry tree around a model's versions (``?version=V``: around that one)."""
    name, version = request.match_info["name"], request.query.get("version")
    doc = await asyncio.to_thread(request.app[REGISTRY].lineage, name, version)
    return web.json_response(doc)


async def publish(request: web.Request) -> web.Response:
    """Multipart upload: the manifest part, then one part per file.

    The manifest is ``manifest`` (unsigned: the control plane signs it) or
    ``signed_manifest`` (signed offline by a release key, stored as it is).
    """
    keys, registry = request.app[KEYS], request.app[REGISTRY]
    with tempfile.TemporaryDirectory(dir=registry.store_dir) as tmp:
        # keys.check_upload runs on the manifest part, before any file is read.
        received = await receive_package(request, Path(tmp), keys.check_upload)
        if isinstance(received, SignedManifest):
            record = await asyncio.to_thread(registry.publish_signed, Path(tmp), received)
        else:
            record = await asyncio.to_thread(registry.publish, Path(tmp), received, keys.signer)
    m = record.manifest
    logger.info("published %s %s (%s, key %s)", m.name, m.version, m.variant, record.signed.key_id)
    return web.json_response(record.summary(), status=201)


async def artifact(request: web.Request) -> web.FileResponse:
    """HTTP transport for artifacts; aiohttp's FileResponse honours Range for resume.

    The id is checked by ``artifact_path`` (a hex digest, nothing else): aiohttp
    decodes ``%2F`` into the match, so the route pattern alone does not stop ``/``.
    """
    return web.FileResponse(request.app[REGISTRY].artifact_path(request.match_info["digest"]))


async def start_rollout(request: web.Request) -> web.Response:
    doc = parse_json_object(await request.read(), "rollout request")
    try:
        name = check_name(doc["model"], "model name")
        version = check_name(doc["version"], "model version")
    except KeyError as exc:
        raise InvalidInputError(f"rollout needs {exc.args[0]!r}") from None
    targets = doc.get("devices")
    if targets is not None and not isinstance(targets, list):
        raise InvalidInputError("'devices' must be a list of device ids")
    for device_id in targets or []:
        check_name(device_id, "device id")  # before it becomes a topic
    downgrade = doc.get("allow_downgrade", False)
    if not isinstance(downgrade, bool):  # NOTE: bool("false") is True: never coerce this one
        raise InvalidInputError(f"'allow_downgrade' must be true or false, got {downgrade!r}")
    if downgrade:
        # A downgrade re-opens old, possibly vulnerable versions: more than an operator may do,
        # so a stolen operator token cannot roll the fleet back.
        caller = request[CALLER]
        assert isinstance(caller, Operator)  # the route takes operator tokens only
        caller.require(ADMIN)
    reason = check_reason(doc.get("reason"))
    rollout_id = await request.app[ROLLOUTS].start(
        name, version, targets, allow_downgrade=downgrade
    )
    detail = {"model": name, "version": version, "devices": targets, "downgrade": downgrade}
    await asyncio.to_thread(
        request.app[REGISTRY].audit.append,
        _operator(request),
        "create",
        rollout_id,
        reason,
        detail,
    )
    return web.json_response({"id": rollout_id}, status=202)


def _operator(request: web.Request) -> str:
    caller = request[CALLER]
    assert isinstance(caller, Operator)  # operator routes take operator tokens only
    return caller.name


async def rollouts(request: web.Request) -> web.Response:
    records = await asyncio.to_thread(request.app[REGISTRY].rollouts)
    return web.json_response({"rollouts": records})


async def rollout(request: web.Request) -> web.Response:
    doc = await asyncio.to_thread(request.app[REGISTRY].rollout, request.match_info["id"])
    return web.json_response(doc)


async def abort_rollout(request: web.Request) -> web.Response:
    rollout_id = check_name(request.match_info["id"], "rollout id")
    raw = await request.read()
    reason = check_reason(parse_json_object(raw, "abort request").get("reason") if raw else None)
    await request.app[ROLLOUTS].abort(rollout_id)
    await asyncio.to_thread(
        request.app[REGISTRY].audit.append, _operator(request), "abort", rollout_id, reason
    )
    return web.json_response({"id": rollout_id, "state": "aborted"})


async def events(request: web.Request) -> web.Response:
    device = request.query.get("device")
    found = await asyncio.to_thread(request.app[REGISTRY].events, device)
    return web.json_response({"events": found})
