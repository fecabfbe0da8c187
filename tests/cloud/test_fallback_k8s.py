"""deploy/k8s/fallback.yaml against the real CLI: its arguments parse, and the pod's
grace period leaves room for the drain. (Schemas: tests/test_deploy.py.)"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

from cloud.fallback import register_cli, settings_from_args

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "fallback.yaml"


def test_the_deployment_arguments_are_real_flags_and_the_drain_fits_the_grace_period() -> None:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["fogline", "fallback", "serve"]
    # $(VAR) is Kubernetes' substitution from env; any value of the right shape will do.
    args = [re.sub(r"\$\((\w+)\)", "digits:1", a) for a in container["args"]]
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(), {})
    settings = settings_from_args(parser.parse_args(["serve", *args]))
    assert settings.device_tokens and settings.host == "0.0.0.0"
    assert settings.drain_timeout_s + 5 < pod["terminationGracePeriodSeconds"]
