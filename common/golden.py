"""Golden self-test data: inputs and the outputs the packager saw for them.

Stored as ``golden.npz`` (no pickles) with keys ``input:<name>`` and
``output:<name>``. An agent runs the inputs through a staged model and
activates it only if the outputs match.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np

from common.errors import InvalidInputError, SelfTestError
from common.manifest import Manifest
from common.runtime import LocalRuntime

GOLDEN_FILE = "golden.npz"


def save_golden(path: Path, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    arrays = {f"input:{k}": v for k, v in inputs.items()}
    arrays.update({f"output:{k}": v for k, v in outputs.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    path.write_bytes(buf.getvalue())


def load_golden(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            inputs = {k[6:]: npz[k] for k in npz.files if k.startswith("input:")}
            outputs = {k[7:]: npz[k] for k in npz.files if k.startswith("output:")}
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read golden data {path}: {exc}") from exc
    if not inputs or not outputs:
        raise InvalidInputError(f"golden data {path} has no inputs or no outputs")
    return inputs, outputs


def compare(
    expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], *, atol: float = 1e-3
) -> None:
    """Raise SelfTestError unless every expected output is reproduced within ``atol``."""
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            raise SelfTestError(f"self-test: model produced no output {name!r}")
        if got.shape != want.shape or not np.allclose(got, want, atol=atol):
            worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
            raise SelfTestError(f"self-test: output {name!r} differs (max error {worst:.3g})")


async def self_test(runtime: LocalRuntime, directory: Path, manifest: Manifest) -> None:
    """Run a loaded package's golden inputs; SelfTestError unless its golden outputs come out.

    The agent runs it before activating a slot, the fallback before serving a version.
    """
    try:
        golden = directory / manifest.file("golden").name
    except KeyError:
        raise SelfTestError(f"{manifest.name} {manifest.version}: no golden data") from None
    inputs, expected = await asyncio.to_thread(load_golden, golden)
    outputs = await asyncio.to_thread(runtime.infer_sync, inputs, list(expected))
    compare(expected, {t.name: t.data for t in outputs})
