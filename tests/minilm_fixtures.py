"""The real MiniLM, exported, quantised, judged and packaged once per test session.

An export plus quantisation plus the fp32 PyTorch reference over the shipped
sentences takes a minute or more on two cores, so every test that needs them
shares one build (``minilm_build()``), made in a temporary directory removed
at exit. Plain helper module: ``from tests.minilm_fixtures import minilm_build``.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from cloud.pipeline.minilm_package import MiniLMBuild, build_minilm_packages


@functools.lru_cache(maxsize=1)
def minilm_build() -> MiniLMBuild:
    workdir = Path(tempfile.mkdtemp(prefix="fogline-minilm-test-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    return build_minilm_packages(workdir)
