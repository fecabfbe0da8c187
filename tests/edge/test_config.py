"""Agent settings: file, then environment, then flags; mistakes are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import InvalidInputError
from edge.config import AgentConfig

BASE = {"device_id": "d1", "state_dir": "/tmp/x", "trusted_keys": ["ab"], "model": "m"}


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(doc))
    return path


def test_environment_overrides_the_file_with_typed_values(tmp_path) -> None:
    env = {
        "FOGLINE_AGENT_API_PORT": "8081",
        "FOGLINE_AGENT_CLOUD_URL": "http://cloud:9000",
        "OTHER": "ignored",
    }
    cfg = AgentConfig.from_file(write(tmp_path, BASE), **AgentConfig.env_overrides(env))
    assert cfg.api_port == 8081 and cfg.cloud_url == "http://cloud:9000"
    assert cfg.state_dir == Path("/tmp/x")


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({**BASE, "colour": "blue"}, "unknown agent config keys"),
        ({k: v for k, v in BASE.items() if k != "model"}, "missing required keys: model$"),
        ({}, "missing required keys: device_id, state_dir, trusted_keys, model$"),
        ({**BASE, "trusted_keys": []}, "trusted_keys"),
        ({**BASE, "models": {"../x": {}}}, "invalid model name"),
        ({**BASE, "models": {"m": {"uncertainty_threshold": 2}}}, "0..1"),
        ({**BASE, "models": {"m": {"cloud_model": "a/b"}}}, "cloud_model"),
        ({**BASE, "memory_budget_bytes": -1}, "memory_budget_bytes"),
        ({**BASE, "local_budget_ms": float("nan")}, "local_budget_ms"),
        ({**BASE, "cloud_probe_s": 0}, "cloud_probe_s"),
        ({**BASE, "repair_rounds": 0}, "repair_rounds"),
        ({**BASE, "repair_rounds": 1e9}, "repair_rounds"),
        ({**BASE, "repair_rounds": True}, "repair_rounds"),
        ({**BASE, "repair_rounds": "3"}, "repair_rounds"),
    ],
)
def test_bad_config_files_say_what_is_wrong(tmp_path, doc, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        AgentConfig.from_file(write(tmp_path, doc))


def test_unreadable_config_and_unknown_env_key(tmp_path) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(InvalidInputError, match="cannot read"):
        AgentConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(InvalidInputError, match="FOGLINE_AGENT_PORTT"):
        AgentConfig.env_overrides({"FOGLINE_AGENT_PORTT": "1"})
