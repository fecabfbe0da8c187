"""MiniLM's int8 edge package for the bench, with the export and quantisation cached.

Exporting and quantising MiniLM takes a minute or more on two cores, so the
two ONNX files are kept in a cache directory (``FOGLINE_BENCH_CACHE``, default
``$TMPDIR/fogline-bench-cache``) and reused; packaging goes through the same
``build_minilm_packages`` as the pipeline, judged on a few short sentences.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from cloud.pipeline.minilm import EDGE_CONFIG, EDGE_MAX_TOKENS, export_minilm
from cloud.pipeline.minilm_package import build_minilm_packages, load_sentences, token_counts
from cloud.pipeline.quantize import quantize
from common.manifest import Manifest
from common.text import ATTENTION_MASK, INPUT_IDS

_JUDGE_TEXTS = 16


def cache_dir() -> Path:
    default = Path(tempfile.gettempdir()) / "fogline-bench-cache"
    path = Path(os.environ.get("FOGLINE_BENCH_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_onnx(cache: Path) -> tuple[Path, Path]:
    """The fused fp32 export and its int8 variant, made once (each appears by one rename).

    The int8 file is named after the edge config, so a new config is never served from
    a stale cache.
    """
    tag = hashlib.sha256(json.dumps(EDGE_CONFIG.params(), sort_keys=True).encode()).hexdigest()
    fp32, int8 = cache / "minilm-fp32-fused.onnx", cache / f"minilm-int8-{tag[:12]}.onnx"
    if not fp32.exists():
        export_minilm(cache / "minilm-fp32.tmp.onnx").replace(fp32)
    if not int8.exists():
        quantize(fp32, cache / "minilm-int8.tmp.onnx", EDGE_CONFIG).replace(int8)
    return fp32, int8


def build_edge_package(workdir: Path) -> tuple[Path, Path, Manifest]:
    """(int8 model, edge package dir, unsigned manifest), judged on a few short texts."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fp32, int8 = cached_onnx(cache_dir())
    texts = load_sentences()
    short = [t for t, n in zip(texts, token_counts(texts), strict=True) if n <= EDGE_MAX_TOKENS]
    build = build_minilm_packages(
        workdir, fp32_path=fp32, int8_path=int8, texts=short[:_JUDGE_TEXTS]
    )
    return int8, build.edge_dir, build.edge


def token_feeds(
    n: int, tokens: int = EDGE_MAX_TOKENS, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``n`` batch-1 requests of ``tokens`` token ids ([CLS] … [SEP]), every position attended."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1000, 30000, size=(1, tokens), dtype=np.int64)
        ids[0, 0], ids[0, -1] = 101, 102
        out.append({INPUT_IDS: ids, ATTENTION_MASK: np.ones((1, tokens), dtype=np.int64)})
    return out
