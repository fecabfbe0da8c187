"""A rollout end to end over the generated broker config: enrolled logins, ACL and TLS.

The agents run from the configs ``enroll_device`` wrote; the control plane
uses the login ``fogline broker config`` left in its workdir; both connect
with TLS, trusting a CA made for the test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import pytest

from cloud.enrollment import (
    AgentSettings,
    control_credentials,
    enroll_device,
    write_broker_config,
)
from common.broker_auth import TlsFiles
from common.errors import InvalidInputError
from edge.agent import EdgeAgent
from edge.config import AgentConfig
from fogline.broker import BrokerSecurity, start_broker
from tests.conftest import free_port
from tests.edge.agent_harness import ControlPlane
from tests.tls_certs import make_pki

KINDS = [
    pytest.param(
        "mosquitto",
        marks=pytest.mark.skipif(shutil.which("mosquitto") is None, reason="no mosquitto binary"),
    ),
    "amqtt",
]
DEVICES = ["dev-a", "dev-b"]


def _enroll(workdir: Path, tmp: Path, device_id: str, port: int, ca: Path) -> AgentConfig:
    settings = AgentSettings(
        model="toy",
        state_dir=str(tmp / device_id),
        broker_host="127.0.0.1",
        broker_port=port,
        broker_tls_ca=str(ca),
    )
    enrolled = enroll_device(workdir, device_id, settings)
    return AgentConfig.from_dict(
        {**enrolled, "api_port": free_port(), "chunk_timeout_s": 0.3, "telemetry_interval_s": 0.5}
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_rollout_over_tls_with_enrolled_logins(kind: str, tmp_path: Path) -> None:
    workdir, port = tmp_path / "control", free_port()
    pki = make_pki(tmp_path / "pki")
    configs = [_enroll(workdir, tmp_path, d, port, pki.ca) for d in DEVICES]
    tls = TlsFiles(pki.cert, pki.key, pki.ca)
    files = write_broker_config(workdir, tmp_path / "broker-config", tls=tls)
    security = BrokerSecurity(files.password_file, files.acl_file, tls)
    with start_broker(kind, port=port, workdir=tmp_path / "broker", security=security) as broker:  # type: ignore[arg-type]
        login = control_credentials(workdir)  # what `fogline control serve` reads
        cp = ControlPlane(workdir, broker)
        cp.settings = dataclasses.replace(
            cp.settings,
            broker_username=login.username,
            broker_password=login.password,
            broker_tls_ca=str(pki.ca),
        )
        async with cp, EdgeAgent(configs[0]), EdgeAgent(configs[1]):
            cp.publish_toy(tmp_path, "1")
            await cp.wait_online(DEVICES)
            state = await cp.roll_out("toy", "1", DEVICES)
            assert state["state"] == "succeeded", state
            async with asyncio.timeout(10):  # telemetry flows on each device's own topic
                while not all(d.get("telemetry") for d in cp.registry.devices()):
                    await asyncio.sleep(0.1)


def test_agent_config_checks_its_tls_files(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    base = {"device_id": "d", "state_dir": str(tmp_path), "trusted_keys": ["00"], "model": "m"}
    ok = AgentConfig.from_dict({**base, "broker_tls_ca": str(pki.ca)})
    assert ok.broker_tls_ca == str(pki.ca)
    for bad in (
        {"broker_tls_ca": str(tmp_path / "missing.pem")},
        {"broker_tls_cert": str(pki.cert), "broker_tls_key": str(pki.key)},  # no CA
        {"broker_tls_ca": str(pki.ca), "broker_tls_cert": str(pki.cert)},  # no key
    ):
        with pytest.raises(InvalidInputError):
            AgentConfig.from_dict({**base, **bad})
