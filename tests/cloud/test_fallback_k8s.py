"""deploy/k8s/fallback.yaml: valid Kubernetes, and every variable it sets is a real flag's."""

from __future__ import annotations

import argparse
from pathlib import Path

import kubernetes_validate
import yaml

from cloud.fallback import register_cli, settings_from_args
from cloud.fallback.settings import ENV_PREFIX, env_name

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "fallback.yaml"


def docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_manifest_is_valid_kubernetes() -> None:
    version = kubernetes_validate.utils.latest_version()
    for doc in docs():
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_variable_is_a_flag_and_the_probes_are_the_v2_health_routes() -> None:
    (deployment,) = [d for d in docs() if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    environ = {
        e["name"]: e.get("value", "from-a-secret")
        for e in container["env"]
        if e["name"].startswith(ENV_PREFIX)
    }
    assert len(environ) == len(container["env"])
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register_cli(sub, environ)
    serve = sub.choices["serve"]
    known = {env_name(a) for a in serve._actions if a.option_strings and a.dest != "help"}
    assert set(environ) <= known, set(environ) - known
    s = settings_from_args(parser.parse_args(["serve"]))
    assert s.following and s.device_tokens and s.host == "0.0.0.0" and s.keep_versions == 2
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert s.drain_timeout_s + 5 < grace  # preStop sleep + drain fit in the grace period
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
