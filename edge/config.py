"""The agent's settings: one object, built once in the entry point (file, env, flags)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import FoglineError, InvalidInputError
from common.keyring import apply_chain
from common.names import check_name
from common.policy import MAX_LATENCY_BUDGET_MS, parse_policy
from common.signing import TrustStore
from edge.hard_examples import parse_settings as parse_hard_example_settings

ENV_PREFIX = "FOGLINE_AGENT_"


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: Path
    trusted_keys: list[str]  # hex Ed25519 public keys of the control plane: the anchors
    # The model served from the start (cloud only until a rollout brings a local one);
    # every model rolled out later is served beside it under its own name.
    model: str
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
    api_token: str | None = None  # bearer token the local API requires (none: no auth)
    insecure_public: bool = False  # allow a non-loopback API without api_token (local only)
    max_body_bytes: int = 64 << 20  # largest local infer body; 413 past it
    body_timeout_s: float = 30.0  # a body not in within this gets 408
    local_budget_ms: float = 50.0  # local queue wait above this sends requests to the cloud
    # Per model name: {"cloud_model": NAME, and common.policy.ModelPolicy fields}; a
    # signed set-policy command overrides the policy fields (kept in the state dir).
    models: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    memory_budget_bytes: int | None = None  # sum of loaded model files; a deploy past it fails
    disk_budget_bytes: int | None = None  # bytes of every model's slots; a deploy past it fails
    cloud_probe_s: float = 5.0  # cloud latency older than this: one request goes to measure it
    telemetry_interval_s: float = 10.0
    chunk_timeout_s: float = 3.0  # no chunk for this long: ask for the missing ones
    # Requests for missing chunks (each wait twice the last, up to 8 chunk timeouts)
    # before the download gives up on MQTT and takes HTTP, or fails without it.
    repair_rounds: int = 10
    artifact_transport: str = "mqtt"  # "mqtt" (HTTP as fallback) or "http" (HTTP only)
    intra_op_threads: int = 1
    # The fleet's signed keyring at enrollment (cloud.keys.enrollment_trust): the device
    # starts at its version, so an older keyring is never accepted.
    trusted_keyring: dict[str, Any] | None = None
    # Set at enrollment (site=berlin, ...) and reported in status: staged rollouts pick
    # devices by them. The control plane trusts its own enrollment record over these.
    labels: dict[str, str] = field(default_factory=dict)
    # The control plane's base URL: where hard examples go (with cloud_token, the
    # device's own token). None: none are kept.
    control_url: str | None = None
    # {sample_rate, max_rows, upload_interval_s} for escalations kept as hard examples
    hard_examples: dict[str, Any] = field(default_factory=dict)

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
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        known = set(types)
        out: dict[str, Any] = {}
        for name, raw in environ.items():
            if not name.startswith(ENV_PREFIX):
                continue
            key = name[len(ENV_PREFIX) :].lower()
            if key not in known:
                raise InvalidInputError(f"{name}: no agent config key {key!r}")
            if types[key] in ("str", "str | None"):
                out[key] = raw  # a token of digits stays a string
                continue
            try:
                out[key] = json.loads(raw)
            except ValueError:
                out[key] = raw
        return out

    @classmethod
    def required_keys(cls) -> list[str]:
        """The keys without a default, in declaration order."""
        no_default = dataclasses.MISSING
        return [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is no_default and f.default_factory is no_default
        ]

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> AgentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(doc) - known
        if unknown:
            raise InvalidInputError(f"unknown agent config keys: {sorted(unknown)}")
        missing = [name for name in cls.required_keys() if name not in doc]
        if missing:
            raise InvalidInputError(f"agent config: missing required keys: {', '.join(missing)}")
        try:
            cfg = cls(**{**doc, "state_dir": Path(doc["state_dir"])})
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"agent config: {exc}") from exc
        if not isinstance(cfg.labels, dict):
            raise InvalidInputError("agent config: labels must be an object of names")
        for key, value in cfg.labels.items():
            check_name(key, "label key")
            check_name(value, "label value")
        if cfg.artifact_transport not in ("mqtt", "http"):
            raise InvalidInputError("agent config: artifact_transport must be 'mqtt' or 'http'")
        _check_tls_files(cfg)
        _check_models(cfg)
        try:
            parse_hard_example_settings(cfg.hard_examples)
        except ValueError as exc:
            raise InvalidInputError(f"agent config: {exc}") from None
        if cfg.control_url is not None and not cfg.control_url.startswith(("http://", "https://")):
            raise InvalidInputError("agent config: control_url must be an http(s) URL")
        if not cfg.trusted_keys:
            raise InvalidInputError("agent config: trusted_keys must list at least one key")
        cfg.check_api_exposure()
        if cfg.trusted_keyring is not None:
            cfg.initial_trust()  # a keyring the anchors did not sign: an error now, not later
        return cfg

    def initial_trust(self) -> TrustStore:
        """The anchors (``trusted_keys``), moved to the enrollment keyring if there is one."""
        try:
            trust = TrustStore(list(self.trusted_keys))
            if self.trusted_keyring is not None:
                trust, _ = apply_chain(trust, [self.trusted_keyring], require_newer=False)
        except FoglineError as exc:
            raise InvalidInputError(f"agent config: trusted keys: {exc}") from exc
        return trust

    @property
    def api_is_loopback(self) -> bool:
        if self.api_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.api_host).is_loopback
        except ValueError:
            return False  # a host name may resolve anywhere: treat it as public

    @property
    def cloud_allowed(self) -> bool:
        """Whether local API callers may cause escalations (spending the device's token).

        NOTE: never for anonymous callers from the network: a public API without
        ``api_token`` (only possible with ``insecure_public``) serves locally only.
        """
        return bool(self.api_token) or self.api_is_loopback

    def check_api_exposure(self) -> None:
        """Refuse a non-loopback API with no token, unless ``insecure_public`` says so."""
        if self.api_token is not None and not self.api_token.strip():
            raise InvalidInputError("agent config: api_token must not be empty")
        if self.api_is_loopback or self.api_token or self.insecure_public:
            return
        raise InvalidInputError(
            f"agent config: api_host {self.api_host!r} is not loopback and no api_token is "
            "set: anyone on the network could use this device. Set api_token "
            "(or FOGLINE_AGENT_API_TOKEN), bind to 127.0.0.1, or pass --insecure-public "
            "(insecure_public: true) to serve the local model to anyone, never the cloud"
        )

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["state_dir"] = str(self.state_dir)
        return doc


def _check_models(cfg: AgentConfig) -> None:
    """Model names and policies from the file pass the same checks as a signed command's."""
    check_name(cfg.model, "model name")
    if not isinstance(cfg.models, dict):
        raise InvalidInputError("agent config: models must be an object keyed by model name")
    for name, entry in cfg.models.items():
        check_name(name, "model name in agent config")
        if not isinstance(entry, dict):
            raise InvalidInputError(f"agent config: models.{name} must be an object")
        policy = {k: v for k, v in entry.items() if k != "cloud_model"}
        if policy:
            parse_policy(policy)
        if "cloud_model" in entry:
            check_name(entry["cloud_model"], f"models.{name}.cloud_model")
    for key in ("memory_budget_bytes", "disk_budget_bytes"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise InvalidInputError(f"agent config: {key} must be a positive integer")
    rounds = cfg.repair_rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= 100:
        raise InvalidInputError("agent config: repair_rounds must be an integer from 1 to 100")
    for key in ("local_budget_ms", "cloud_probe_s"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError(f"agent config: {key} must be a number")
        if not 0 < value <= MAX_LATENCY_BUDGET_MS:  # NOTE: also false for NaN
            raise InvalidInputError(f"agent config: {key} must be positive")


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
