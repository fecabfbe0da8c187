"""Fixtures for the V2 server tests: a real toy package and its loaded ONNX Runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from common.onnx_runtime import OnnxRuntime
from tests.model_fixtures import Package, make_package


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    return make_package(tmp_path_factory.mktemp("pkg"))


@pytest.fixture
async def runtime(package: Package) -> AsyncIterator[OnnxRuntime]:
    rt = OnnxRuntime(package.model_path, package.manifest)
    await rt.load()
    yield rt
    await rt.unload()
