"""The agent's settings: one object, built once in the entry point (file, env, flags)."""

from __future__ import annotations

import dataclasses
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InvalidInputError

ENV_PREFIX = "FOGLINE_AGENT_"


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: Path
    trusted_keys: list[str]  # hex Ed25519 public keys of the control plane
    model: str  # the model name this device serves (edge variant locally, cloud variant remote)
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_username: str | None = None
    broker_password: str | None = None
    broker_tls_ca: str | None = None  # CA file: connect with TLS, checking the broker's cert
    broker_tls_cert: str | None = None  # optional client certificate (with broker_tls_key)
    broker_tls_key: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    cloud_url: str | None = None  # base URL of the fallback's V2 API
    cloud_token: str | None = None
    cloud_timeout_s: float = 2.0
    max_inflight: int = 64  # concurrent local API requests before 503 + Retry-After
    local_budget_ms: float = 50.0  # local queue wait above this sends requests to the cloud
    telemetry_interval_s: float = 10.0
    chunk_timeout_s: float = 3.0  # no chunk for this long: ask for the missing ones
    artifact_transport: str = "mqtt"  # "mqtt" (HTTP as fallback) or "http" (HTTP only)
    intra_op_threads: int = 1

    @property
    def api_url(self) -> str:
        host = self.api_host if self.api_host not in ("0.0.0.0", "") else socket.gethostname()
        return f"http://{host}:{self.api_port}"

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> AgentConfig:
        """Read a JSON config, then apply ``overrides`` (env, flags) that are not None.

        Unknown keys and missing required keys are errors.
        """
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot read agent config {path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise InvalidInputError(f"agent config {path} must be a JSON object")
        doc.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(doc)

    @classmethod
    def env_overrides(cls, environ: dict[str, str]) -> dict[str, Any]:
        """``FOGLINE_AGENT_<KEY>`` variables as config values (e.g. in a container).

        Values are parsed as JSON when they parse (numbers, lists, booleans), else
        taken as strings, so ``FOGLINE_AGENT_API_PORT=8081`` is an int.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for name, raw in environ.items():
            if not name.startswith(ENV_PREFIX):
                continue
            key = name[len(ENV_PREFIX) :].lower()
            if key not in known:
                raise InvalidInputError(f"{name}: no agent config key {key!r}")
            try:
                out[key] = json.loads(raw)
            except ValueError:
                out[key] = raw
        return out

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> AgentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(doc) - known
        if unknown:
            raise InvalidInputError(f"unknown agent config keys: {sorted(unknown)}")
        try:
            cfg = cls(**{**doc, "state_dir": Path(doc["state_dir"])})
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"agent config: {exc}") from exc
        if cfg.artifact_transport not in ("mqtt", "http"):
            raise InvalidInputError("agent config: artifact_transport must be 'mqtt' or 'http'")
        _check_tls_files(cfg)
        if not cfg.trusted_keys:
            raise InvalidInputError("agent config: trusted_keys must list at least one key")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["state_dir"] = str(self.state_dir)
        return doc


def _check_tls_files(cfg: AgentConfig) -> None:
    """Missing TLS files are a config error at start, not a failure deep in the MQTT thread."""
    if (cfg.broker_tls_cert or cfg.broker_tls_key) and not cfg.broker_tls_ca:
        raise InvalidInputError("agent config: broker_tls_cert/key need broker_tls_ca")
    if bool(cfg.broker_tls_cert) != bool(cfg.broker_tls_key):
        raise InvalidInputError("agent config: broker_tls_cert and broker_tls_key go together")
    for key in ("broker_tls_ca", "broker_tls_cert", "broker_tls_key"):
        value = getattr(cfg, key)
        if value and not Path(value).is_file():
            raise InvalidInputError(f"agent config: {key} {value!r} is not a file")
