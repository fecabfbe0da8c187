"""Hard examples: what the edge escalated, with the cloud's answer, kept per model.

Agents sample escalated requests whose cloud answer came back and upload them
(`POST /api/hard-examples/{model}`, a device token only: an example is
attributed to the device that sent it). The control plane checks every
tensor against the signed manifest of the version the device says it ran,
turns the cloud's answer into training targets (the argmax class for a
classifier, the output itself otherwise) and keeps the result as a data set
per model in the pipeline's own ``D.npz`` format, so that
``fogline model train --extra-data hard-examples:MODEL`` (and ``compress``,
``package``) read it like any other data file.

Uploads are untrusted: bounded in rows and bytes (the body limit), finite,
of the manifest's names, dtypes and shapes; the store per model is bounded in
rows and bytes (the oldest upload of the device holding the most goes first).
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from cloud.control_auth import CALLER
from cloud.pipeline.model_data import LABELS, REFERENCE
from cloud.registry import Registry
from common.errors import InvalidInputError, NotFoundError, PayloadTooLargeError
from common.inference import V2_TO_NUMPY, Tensor, request_from_rest, response_from_rest
from common.manifest import Manifest, TensorSpec
from common.names import check_name, safe_join
from common.tensor_json import JsonLimits, parse_infer_json

MAX_UPLOAD_EXAMPLES = 256  # examples (each a batch of rows) in one upload
MAX_UPLOAD_ROWS = 1024
MAX_ROWS_PER_MODEL = 50_000  # the oldest uploads are dropped past this
# ... or past this on disk: a row of a dynamic (sequence) dimension may be ~4 MB as int64
MAX_BYTES_PER_MODEL = 256 * 1024**2
LIMITS = JsonLimits(max_elements=4 << 20)


def _check_tensor(t: Tensor, spec: TensorSpec, where: str) -> None:
    if t.data.dtype != V2_TO_NUMPY[spec.datatype]:
        raise InvalidInputError(
            f"{where}: {t.name!r} is {t.datatype}, the model has {spec.datatype}"
        )
    if t.data.ndim != len(spec.shape) or any(
        d != -1 and d != n for d, n in zip(spec.shape[1:], t.data.shape[1:], strict=False)
    ):
        raise InvalidInputError(f"{where}: {t.name!r} has shape {t.shape}, the model {spec.shape}")
    if t.data.dtype.kind == "f" and not np.isfinite(t.data).all():
        raise InvalidInputError(f"{where}: {t.name!r} holds NaN or infinity")


def _by_name(tensors: list[Tensor], specs: list[TensorSpec], where: str) -> dict[str, np.ndarray]:
    given = {t.name: t for t in tensors}
    missing = [s.name for s in specs if s.name not in given]
    if missing or len(given) != len(tensors):
        raise InvalidInputError(f"{where}: needs exactly one of each of {[s.name for s in specs]}")
    for spec in specs:
        _check_tensor(given[spec.name], spec, where)
    return {s.name: given[s.name].data for s in specs}


def parse_upload(body: bytes, manifest: Manifest) -> tuple[dict[str, np.ndarray], int]:
    """The upload as D.npz arrays (inputs + labels or reference) and its row count."""
    doc = parse_infer_json(body, LIMITS, "hard examples")
    examples = doc.get("examples")
    if not isinstance(examples, list) or not examples:
        raise InvalidInputError("hard examples: 'examples' must be a non-empty list")
    if len(examples) > MAX_UPLOAD_EXAMPLES:
        raise PayloadTooLargeError(f"hard examples: more than {MAX_UPLOAD_EXAMPLES} per upload")
    first_output = manifest.outputs[:1]
    columns: dict[str, list[np.ndarray]] = {s.name: [] for s in manifest.inputs}
    targets: list[np.ndarray] = []
    for i, ex in enumerate(examples):
        where = f"examples[{i}]"
        if not isinstance(ex, dict):
            raise InvalidInputError(f"{where}: must be an object with 'request' and 'response'")
        req = request_from_rest(ex.get("request") or {}, manifest.name, limits=LIMITS)
        resp = response_from_rest(ex.get("response") or {}, LIMITS)
        inputs = _by_name(req.inputs, manifest.inputs, f"{where}.request")
        (output,) = _by_name(
            [t for t in resp.outputs if t.name == first_output[0].name], first_output, where
        ).values()
        rows = {len(v) for v in inputs.values()} | {len(output)}
        if len(rows) != 1:
            raise InvalidInputError(f"{where}: inputs and output have different row counts")
        for name, value in inputs.items():
            columns[name].append(value)
        targets.append(output)
    arrays = {name: np.concatenate(parts) for name, parts in columns.items()}
    rows = len(next(iter(arrays.values())))
    if rows == 0:  # nothing to learn from, and argmax of no rows is a ValueError (a 500)
        raise InvalidInputError("hard examples: the examples hold no rows")
    if rows > MAX_UPLOAD_ROWS:
        raise PayloadTooLargeError(f"hard examples: more than {MAX_UPLOAD_ROWS} rows per upload")
    target = np.concatenate(targets)
    # "classification" from `fogline model package`, "image-classification" from the
    # digits pipeline (fogline demo): a classifier's rows are labelled with the argmax.
    if manifest.task.endswith("classification"):
        arrays[LABELS] = target.reshape(rows, -1).argmax(axis=1).astype(np.int64)
    else:
        arrays[REFERENCE] = target
    return arrays, rows


class HardExampleStore:
    """``WORKDIR/hard-examples/{model}/{time}~{device}~{nonce}.npz``, one file per upload."""

    def __init__(
        self,
        root: Path,
        registry: Registry,
        max_rows: int = MAX_ROWS_PER_MODEL,
        max_bytes: int = MAX_BYTES_PER_MODEL,
    ) -> None:
        self.root = root
        self.registry = registry  # the signed manifests uploads are checked against
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._sizes: dict[Path, tuple[int, int]] = {}  # rows, bytes: an upload never changes
        # Uploads and reads run in threads: a trim must not delete what a read just listed.
        self._lock = threading.Lock()

    def _dir(self, model: str) -> Path:
        return safe_join(self.root, check_name(model, "model name"))

    def add(self, model: str, device_id: str, arrays: dict[str, np.ndarray]) -> Path:
        directory = self._dir(model)
        directory.mkdir(parents=True, exist_ok=True)
        # "~" is in no checked name: the device id is read back from the file name
        name = f"{time.time_ns():020d}~{check_name(device_id, 'device id')}~{secrets.token_hex(4)}"
        path = directory / f"{name}.npz"  # each part checked above: digits, a name, hex
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        with self._lock:
            os.replace(tmp, path)
            self._trim(directory)
        return path

    def _files(self, directory: Path) -> list[Path]:
        return sorted(directory.glob("*.npz")) if directory.is_dir() else []

    def _trim(self, directory: Path) -> None:
        """Past the bound, the oldest upload of the device holding the most rows goes:
        one device's flood pushes out its own examples, never the rest of the fleet's."""
        sizes = {f: self._size(f) for f in self._files(directory)}  # oldest first
        while sizes and (
            sum(r for r, _ in sizes.values()) > self.max_rows
            or sum(b for _, b in sizes.values()) > self.max_bytes
        ):
            share: Counter[str] = Counter()  # of the bound, in rows or bytes, whichever is more
            for f, (r, b) in sizes.items():
                share[_device_of(f)] += max(r / self.max_rows, b / self.max_bytes)
            heaviest = share.most_common(1)[0][0]
            oldest = next(f for f in sizes if _device_of(f) == heaviest)
            oldest.unlink(missing_ok=True)
            del sizes[oldest]
            self._sizes.pop(oldest, None)

    def _size(self, path: Path) -> tuple[int, int]:
        """Rows and bytes of one upload, read once: each upload would otherwise open all."""
        if path not in self._sizes:
            with np.load(path, allow_pickle=False) as npz:
                self._sizes[path] = (len(npz[npz.files[0]]), path.stat().st_size)
        return self._sizes[path]

    def summary(self) -> list[dict[str, Any]]:
        with self._lock:
            return self._summary()

    def _summary(self) -> list[dict[str, Any]]:
        out = []
        for directory in sorted(p for p in self.root.glob("*") if p.is_dir()):
            files = self._files(directory)
            rows = sum(self._size(f)[0] for f in files)
            devices = len({_device_of(f) for f in files})
            model = directory.name
            out.append({"model": model, "rows": rows, "uploads": len(files), "devices": devices})
        return out

    def dataset(self, model: str, manifest: Manifest) -> bytes:
        """Every upload that fits ``manifest``'s inputs, as one ``D.npz`` (bytes)."""
        parts: list[dict[str, np.ndarray]] = []
        with self._lock:
            uploads = [self._load(path) for path in self._files(self._dir(model))]
        for arrays in uploads:
            if all(
                s.name in arrays and arrays[s.name].dtype == V2_TO_NUMPY[s.datatype]
                for s in manifest.inputs
            ):
                parts.append(arrays)
        if not parts:
            raise NotFoundError(f"no hard examples for model {model!r} yet")
        keys = sorted(set.intersection(*(set(p) for p in parts)))
        # A dynamic dimension (a sequence length) or an older version may differ: what
        # does not stack with the newest upload is left out, not a 500 for every reader.
        newest = parts[-1]
        parts = [p for p in parts if all(p[k].shape[1:] == newest[k].shape[1:] for k in keys)]
        merged = {k: np.concatenate([p[k] for p in parts]) for k in keys}
        buf = io.BytesIO()
        np.savez(buf, **merged)  # type: ignore[arg-type]
        return buf.getvalue()

    @staticmethod
    def _load(path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    def manifest(self, model: str, version: str | None) -> Manifest:
        """The edge manifest of ``version``, or of the newest release when None."""
        return _manifest(self.registry, model, version)


def _device_of(path: Path) -> str:
    return path.stem.split("~")[1]


HARD_EXAMPLES = web.AppKey("hard_examples", HardExampleStore)


def _manifest(registry: Registry, model: str, version: str | None) -> Manifest:
    if version is None:
        records = [r for r in registry.versions(model) if r.manifest.variant == "edge"]
        if not records:
            raise NotFoundError(f"no edge version of model {model!r}")
        return max(records, key=lambda r: r.manifest.release).manifest
    return registry.version(model, check_name(version, "model version"), "edge").manifest


async def upload(request: web.Request) -> web.Response:
    """A device's upload; the caller (from its device token) is who sent it."""
    device_id = request[CALLER]
    assert isinstance(device_id, str)  # the route takes device tokens only
    store = request.app[HARD_EXAMPLES]
    model = check_name(request.match_info["name"], "model name")
    version = request.query.get("version")
    manifest = await asyncio.to_thread(store.manifest, model, version)
    arrays, rows = await asyncio.to_thread(parse_upload, await request.read(), manifest)
    await asyncio.to_thread(store.add, model, device_id, arrays)
    return web.json_response({"model": model, "rows": rows}, status=201)


async def download(request: web.Request) -> web.Response:
    store = request.app[HARD_EXAMPLES]
    model = check_name(request.match_info["name"], "model name")
    manifest = await asyncio.to_thread(store.manifest, model, None)
    data = await asyncio.to_thread(store.dataset, model, manifest)
    return web.Response(body=data, content_type="application/octet-stream")


async def listing(request: web.Request) -> web.Response:
    return web.json_response(
        {"models": await asyncio.to_thread(request.app[HARD_EXAMPLES].summary)}
    )
