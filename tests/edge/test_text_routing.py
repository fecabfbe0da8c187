"""Text through a real agent and a real fallback (separate processes): local when short,
escalated as ``heavy`` when longer than the edge's 128 tokens, refused over the cloud's 512.

Both serve the toy text model (tests/text_model.py) with MiniLM's real tokenizer;
apps send V2 ``BYTES`` text as plain JSON and through NVIDIA's tritonclient.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from common.signing import Signer
from tests.server_processes import ServerProcess, start_agent, start_fallback
from tests.text_model import make_text_package, words

httpclient = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: Any
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    tmp = tmp_path_factory.mktemp("text-routing")
    signer = Signer.generate()
    edge_pkg = make_text_package(tmp / "edge", variant="edge", signer=signer)
    cloud_pkg = make_text_package(tmp / "cloud", variant="cloud", signer=signer)
    fallback = start_fallback(cloud_pkg, tmp)
    try:
        agent = start_agent(edge_pkg, tmp, mosquitto, model="text", cloud_url=fallback.url)
    except BaseException:
        fallback.stop()
        raise
    yield agent, fallback
    agent.stop()
    fallback.stop()


async def post(url: str, texts: list[str], **params: Any) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]
    }
    if params:
        body["parameters"] = params
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v2/models/text/infer", json=body) as resp,
    ):
        return resp.status, await resp.json()


def embedding(doc: dict[str, Any]) -> np.ndarray:
    out = doc["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


async def test_short_text_is_served_on_the_edge(servers):
    agent, _ = servers
    status, doc = await post(agent.url, ["A short sentence.", words(126)])  # 128 tokens
    assert status == 200, doc
    assert doc["parameters"]["fogline.served_by"] == "edge"
    assert embedding(doc).shape == (2, 8)


async def test_long_text_goes_to_the_cloud_as_heavy(servers):
    agent, fallback = servers
    texts = ["short", words(127)]  # 129 tokens: one over the edge's limit
    status, doc = await post(agent.url, texts)
    assert status == 200, doc
    params = doc["parameters"]
    assert (params["fogline.served_by"], params["fogline.escalation_reason"]) == ("cloud", "heavy")
    # The agent forwarded the text itself: the cloud tokenised it to the same answer.
    status, direct = await post(fallback.url, texts)
    assert status == 200
    np.testing.assert_allclose(embedding(doc), embedding(direct), atol=1e-6)


async def test_text_over_the_cloud_limit_is_a_clear_400(servers):
    agent, _ = servers
    status, doc = await post(agent.url, [words(600)])
    assert status == 400, doc
    assert "602 tokens, 90 over this model's limit of 512" in doc["error"]


async def test_forced_local_long_text_is_refused_not_cut(servers):
    agent, _ = servers
    status, doc = await post(agent.url, [words(200)], **{"fogline.route": "local"})
    assert status == 400
    assert "over this model's limit of 128" in doc["error"]


async def test_attacks_through_the_agent_leave_it_serving(servers):
    agent, _ = servers
    for texts, message in (([""], "is empty"), (["\ud800"], "not valid UTF-8")):
        status, doc = await post(agent.url, texts)
        assert status == 400 and message in doc["error"], doc
    status, doc = await post(agent.url, ["x" * (1 << 20)])
    assert status == 413, doc
    status, doc = await post(agent.url, ["still serving"])
    assert status == 200 and doc["parameters"]["fogline.served_by"] == "edge"


def triton_text(url: str, texts: list[str], *, binary: bool) -> tuple[np.ndarray, dict[str, Any]]:
    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        inp = httpclient.InferInput("text", [len(texts)], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary)
        out = httpclient.InferRequestedOutput("embedding", binary_data=binary)
        result = client.infer("text", [inp], outputs=[out])
        return result.as_numpy("embedding"), result.get_response()
    finally:
        client.close()


@pytest.mark.parametrize("binary", [True, False])
async def test_tritonclient_sends_text(servers, binary: bool):
    agent, _ = servers
    local, response = await asyncio.to_thread(
        triton_text, agent.url, ["hello there", "general kenobi"], binary=binary
    )
    assert local.shape == (2, 8)
    assert response["parameters"]["fogline.served_by"] == "edge"
    heavy, response = await asyncio.to_thread(triton_text, agent.url, [words(300)], binary=binary)
    assert heavy.shape == (1, 8)
    assert response["parameters"]["fogline.escalation_reason"] == "heavy"


def test_packages_list_the_tokenizer_as_a_signed_file(tmp_path: Path):
    pkg = make_text_package(tmp_path / "p", variant="edge")
    entry = pkg.manifest.file("tokenizer")
    assert entry.name == "tokenizer.json"
    assert pkg.manifest.routing.max_sequence_length == 128
    assert pkg.manifest.to_dict()["routing"]["max_sequence_length"] == 128
