"""Fuzz: malformed V2 requests against a real agent and a real fallback, over real HTTP.

Random and mutated JSON bodies, wrong datatypes, shapes that do not match their
data, huge declared shapes, bad binary headers and ``Inference-Header-Content-Length``
values, truncated binary payloads, random bytes, deep nesting, NaN. Every answer
must be 2xx or 4xx (never 5xx), both servers must serve a valid request after,
and their memory must stay bounded. The default run is short; ``-m slow`` runs
the long one.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.model_fixtures import make_package, toy_input, v2_infer_body
from tests.server_processes import ServerProcess, start_agent, start_fallback

BINARY = "Inference-Header-Content-Length"
PATHS = ["/v2/models/toy/infer", "/v2/models/toy/versions/1/infer", "/v2/models/nope/infer"]
DATATYPES = ["FP32", "FP16", "FP64", "INT8", "INT64", "UINT64", "BOOL", "BYTES", "fp32", ""]
TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "nan", "+1", ".5", "01", "1 2", "]", "[", ",,"]
TOKENS += ["true", "null", '"x"', "{}", "1e", "-", "0x10", "1_0", "\x00", "\\u0000"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
dims = st.integers(0, 2**64) | st.sampled_from([-1, 64, 2**31, 2**62]) | json_values
numbers = st.lists(st.floats(-1e6, 1e6, width=32) | st.integers(-300, 300), max_size=200)


def valid_tensor(rows: int = 2) -> dict[str, Any]:
    return dict(v2_infer_body(rows)["inputs"][0])


@st.composite
def mutated_json(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    tensor = valid_tensor(draw(st.integers(1, 3)))
    field = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters", None]))
    if field == "datatype":
        tensor["datatype"] = draw(st.sampled_from(DATATYPES) | json_values)
    elif field == "shape":
        tensor["shape"] = draw(st.lists(dims, max_size=5) | json_values)
    elif field == "data":
        data = draw(numbers)
        tensor["data"] = draw(st.sampled_from([data, [data], [[x] for x in data]]) | json_values)
    elif field is not None:
        tensor[field] = draw(json_values)
    doc: dict[str, Any] = {"inputs": draw(st.sampled_from([[tensor], [tensor, tensor], []]))}
    if draw(st.booleans()):
        route = draw(st.sampled_from(["local", "cloud", "auto", "sideways"]))
        doc["parameters"] = {"fogline.route": route, "binary_data_output": draw(st.booleans())}
    if draw(st.booleans()):
        doc["outputs"] = draw(st.lists(json_values, max_size=2))
    return json.dumps(doc).encode(), {}


@st.composite
def injected_text(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A valid JSON body with one number of its data replaced by something else."""
    body = json.dumps(v2_infer_body(draw(st.integers(1, 3)))).encode()
    numbers_at = [i for i in range(len(body)) if body[i : i + 1] in b"0123456789"]
    at = draw(st.sampled_from(numbers_at))
    token = draw(st.sampled_from(TOKENS) | st.text(max_size=3)).encode()
    return body[:at] + token + body[at + 1 :], {}


@st.composite
def deep(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    n = draw(st.integers(20, 20_000))
    kind = draw(st.sampled_from(["list", "object", "data"]))
    if kind == "list":
        return b"[" * n + b"]" * n, {}
    if kind == "object":
        return b'{"a":' * n + b"1" + b"}" * n, {}
    tensor = json.dumps(valid_tensor(1)).encode().replace(b'"data": [', b'"data": ' + b"[" * n)
    return tensor + b"]" * n, {}


@st.composite
def binary(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    rows = draw(st.integers(1, 3))
    x = toy_input(rows)
    size = draw(st.just(x.nbytes) | st.integers(-10, 2 * x.nbytes) | json_values)
    datatype = draw(st.just("FP32") | st.sampled_from(DATATYPES))
    shape = draw(st.just([rows, 64]) | st.lists(dims, max_size=3))
    head = {"inputs": [{"name": "input", "datatype": datatype, "shape": shape}]}
    head["inputs"][0]["parameters"] = {"binary_data_size": size}
    if draw(st.booleans()):
        head["parameters"] = {"binary_data_output": True}
    header = json.dumps(head).encode()
    blob = draw(st.just(x.tobytes()) | st.binary(max_size=600))
    body = header + blob
    cut = draw(st.none() | st.integers(0, len(body)))  # a truncated payload
    if cut is not None:
        body = body[:cut]
    value = draw(
        st.just(str(len(header)))
        | st.integers(-5, len(body) + 5).map(str)
        | st.sampled_from(["", "abc", "²", "١٢", "9" * 30, "0x10", "1e3", "12 "])
    )
    return body, {BINARY: value}


requests = st.tuples(
    st.sampled_from(["agent", "fallback"]),
    st.sampled_from(PATHS),
    st.binary(max_size=300).map(lambda b: (b, {}))
    | json_values.map(lambda v: (json.dumps(v).encode(), {}))
    | mutated_json()
    | injected_text()
    | deep()
    | binary(),
)


def send(server: ServerProcess, path: str, body: bytes, headers: dict[str, str]) -> int:
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        raw = {k: v.encode() for k, v in headers.items()}  # UTF-8 header values, as sent
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **raw})
        resp = conn.getresponse()
        answer = resp.read()
        if resp.status >= 400:
            assert set(json.loads(answer)) == {"error"}, answer[:200]
        return resp.status
    finally:
        conn.close()


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: Any
) -> Iterator[dict[str, ServerProcess]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    fallback = start_fallback(make_package(tmp / "cloud", variant="cloud", seed=3), tmp)
    try:
        agent = start_agent(make_package(tmp / "edge"), tmp, mosquitto, cloud_url=fallback.url)
        try:
            yield {"agent": agent, "fallback": fallback}
        finally:
            agent.stop()
    finally:
        fallback.stop()


def fuzz(servers: dict[str, ServerProcess], examples: int) -> dict[int, int]:
    base = {name: s.status_kb("VmRSS") for name, s in servers.items()}
    statuses: dict[int, int] = {}

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(requests)
    def one(case: tuple[str, str, tuple[bytes, dict[str, str]]]) -> None:
        target, path, (body, headers) = case
        status = send(servers[target], path, body, headers)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (target, path, headers, body[:300])

    one()
    print(f"{sum(statuses.values())} requests, statuses {sorted(statuses.items())}")
    good = json.dumps(v2_infer_body(2)).encode()
    for name, server in servers.items():
        assert send(server, PATHS[0], good, {}) == 200, name
        grown = server.status_kb("VmRSS") - base[name]
        print(f"{name}: RSS {base[name]} kB -> {base[name] + grown} kB")
        assert grown < 100_000, (name, grown)  # kB: a few stray buffers, not per request
    return statuses


def test_fuzz_gives_only_4xx_and_servers_keep_serving(servers: dict[str, ServerProcess]) -> None:
    statuses = fuzz(servers, 1000)  # 20,000 in the slow run below
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > 250  # it did probe errors


@pytest.mark.slow
def test_fuzz_long(servers: dict[str, ServerProcess]) -> None:
    fuzz(servers, 20_000)
