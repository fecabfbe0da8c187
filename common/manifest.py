"""The model package manifest: what a package holds, for whom, and how to route it.

A package is a directory: ``manifest.json`` (signed) plus the files it names.
The artifact sent over MQTT or HTTP is the files' bytes concatenated in
manifest order; the manifest fixes each file's name, size and SHA-256, so the
receiver splits and checks it without parsing any archive format.

The manifest also lists the SHA-256 of every chunk of that artifact
(``chunks``), so an agent can tell a real chunk from a forged one as each
arrives, not only once the whole artifact is in. ``Manifest.with_chunks`` is
the one place that list is computed, by whoever signs: the control plane at
publish, or an operator signing offline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from common import chunking
from common.errors import InvalidInputError, VerificationError
from common.inference import MAX_DIMS, V2_TO_NUMPY
from common.lineage import Lineage, is_finite_number
from common.names import check_digest, check_name
from common.signing import Purpose, Signer, TrustStore

MANIFEST_FILE = "manifest.json"
UNSIGNED_MANIFEST_FILE = "manifest.unsigned.json"  # what operators upload; the control plane signs
SCHEMA = "fogline.manifest/v1"
PACKAGE_FORMATS = ("onnx", "tensorrt")  # what agents serve (edge.local_runtime)
# NOTE: the one name of a classifier's held-out top-1 accuracy in ``evaluation``, as
# `fogline model package`, the demo, `fogline control models` and the dashboard use it.
ACCURACY = "accuracy"
MAX_RELEASE = 2**31 - 1  # a 32-bit column in PostgreSQL; a counter never gets near it
MAX_EVALUATION = 64  # figures per manifest


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str
    role: str  # "model" | "golden" | "config" | "tokenizer"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # V2 datatype
    shape: list[int]  # -1 for a dynamic dimension


@dataclass(frozen=True)
class Target:
    arch: str = "any"  # x86_64 | aarch64 | any
    accelerator: str = "cpu"  # cpu | cuda
    tensorrt_version: str | None = None
    compute_capability: str | None = None


@dataclass(frozen=True)
class RoutingHints:
    uncertainty_metric: str = "max_prob"  # which kernels.uncertainty score
    uncertainty_threshold: float = 1.0  # escalate when the score is above this
    max_local_batch: int = 64  # a request with more rows goes to the cloud
    # Longest token sequence served here (text models); longer goes to the cloud ("heavy"),
    # or is refused where this is the cloud. None: the model has no sequence axis.
    max_sequence_length: int | None = None


@dataclass(frozen=True)
class ChunkList:
    """How the artifact is cut for MQTT, and the SHA-256 (hex) of each chunk in order."""

    size: int
    sha256: list[str]


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    release: int  # monotonic per model; agents refuse a lower one without a signed downgrade
    variant: str  # "edge" | "cloud"
    task: str
    format: str  # "onnx" | "tensorrt"
    precision: str  # "fp32" | "int8" | "fp16"
    files: list[FileEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    target: Target = field(default_factory=Target)
    routing: RoutingHints = field(default_factory=RoutingHints)
    evaluation: dict[str, float] = field(default_factory=dict)
    parent: str | None = None  # version this one was derived from
    created_at: str = ""
    chunks: ChunkList | None = None  # None only in packages signed before chunk lists
    schema: str = SCHEMA
    lineage: Lineage | None = None  # parent "name:version", method, params (common.lineage)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        # NOTE: no key at all when absent, so manifests signed before these fields verify.
        if self.chunks is None:
            del doc["chunks"]
        if self.lineage is None:
            del doc["lineage"]
        else:
            doc["lineage"] = self.lineage.to_dict()
        if self.routing.max_sequence_length is None:
            del doc["routing"]["max_sequence_length"]
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Manifest:
        """Build from JSON; raise InvalidInputError for anything malformed."""
        try:
            if doc.get("schema") != SCHEMA:
                raise InvalidInputError(f"unsupported manifest schema {doc.get('schema')!r}")
            files = [FileEntry(**f) for f in doc["files"]]
            m = cls(
                **{
                    **doc,
                    "files": files,
                    "inputs": [TensorSpec(**t) for t in doc["inputs"]],
                    "outputs": [TensorSpec(**t) for t in doc["outputs"]],
                    "target": Target(**doc.get("target", {})),
                    "routing": RoutingHints(**doc.get("routing", {})),
                    "chunks": _chunk_list(doc.get("chunks")),
                    "lineage": Lineage.from_dict(doc["lineage"]) if "lineage" in doc else None,
                }
            )
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"malformed manifest: {exc}") from exc
        m.validate()
        return m

    def validate(self) -> None:
        """Every field that becomes a path, a topic or a key is checked here, once."""
        check_name(self.name, "model name")
        check_name(self.version, "model version")
        check_name(self.variant, "variant")
        release = self.release
        if (
            not isinstance(release, int)
            or isinstance(release, bool)
            or not 0 <= release <= MAX_RELEASE
        ):
            raise InvalidInputError(
                f"release must be an integer in 0..{MAX_RELEASE}, got {release!r}"
            )
        if self.parent is not None:
            check_name(self.parent, "parent version")
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise InvalidInputError("manifest lists a file twice")
        for f in self.files:
            # File names are a single path component: nothing may write outside its slot.
            check_name(f.name, "file name in manifest")
            if f.name == MANIFEST_FILE:
                raise InvalidInputError(f"unsafe file name in manifest: {f.name!r}")
            if not isinstance(f.size, int) or isinstance(f.size, bool) or f.size < 0:
                raise InvalidInputError(f"bad size for {f.name!r}")
            check_digest(f.sha256, f"sha256 of {f.name!r}")
        if sum(1 for f in self.files if f.role == "model") != 1:
            raise InvalidInputError("manifest must name exactly one model file")
        self._validate_types()
        if self.chunks is not None:
            self._validate_chunks(self.chunks)

    def _validate_types(self) -> None:
        """Fields that devices read (routing, tensor specs, target): the types they expect.

        NOTE: a manifest is signed and then trusted by every agent that installs it; a
        threshold of "x" would fail every request there, so it is refused here.
        """
        for key in ("task", "format", "precision", "created_at"):
            _check_text(getattr(self, key), key)
        if self.format not in PACKAGE_FORMATS:
            # Refused at publish and before any download, not after it: no agent has a
            # runtime for another format (edge.local_runtime).
            raise InvalidInputError(
                f"package format {self.format!r} is none of {', '.join(PACKAGE_FORMATS)}"
            )
        for key, value in asdict(self.target).items():
            if value is not None:
                _check_text(value, f"target.{key}")
        if not self.inputs or not self.outputs:
            raise InvalidInputError("manifest must list the model's inputs and outputs")
        for spec in (*self.inputs, *self.outputs):
            _check_tensor_spec(spec)
        hints = self.routing
        _check_text(hints.uncertainty_metric, "routing.uncertainty_metric")
        if not _is_number(hints.uncertainty_threshold):
            raise InvalidInputError("routing.uncertainty_threshold must be a number")
        batch = hints.max_local_batch
        if not isinstance(batch, int) or isinstance(batch, bool) or not 0 <= batch <= MAX_RELEASE:
            raise InvalidInputError(f"routing.max_local_batch must be a count, got {batch!r}")
        seq = hints.max_sequence_length
        if seq is not None and (
            not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_RELEASE
        ):
            raise InvalidInputError(f"routing.max_sequence_length must be a count, got {seq!r}")
        if (
            not isinstance(self.evaluation, dict)
            or len(self.evaluation) > MAX_EVALUATION
            or not all(isinstance(k, str) and _is_number(v) for k, v in self.evaluation.items())
        ):
            raise InvalidInputError(
                f"evaluation must map at most {MAX_EVALUATION} names to finite numbers"
            )
        for key in self.evaluation:
            check_name(key, "evaluation metric name")
        if self.lineage is not None:
            if not isinstance(self.lineage, Lineage):
                raise InvalidInputError("malformed manifest: 'lineage' must be an object")
            self.lineage.validate()

    def _validate_chunks(self, chunks: ChunkList) -> None:
        count = chunking.chunk_count(self.artifact_size, _check_chunk_size(chunks.size))
        if count > chunking.MAX_SIGNED_CHUNKS:
            raise InvalidInputError(f"{count} chunks is more than {chunking.MAX_SIGNED_CHUNKS}")
        if not isinstance(chunks.sha256, list) or len(chunks.sha256) != count:
            raise InvalidInputError(f"the chunk list must hold {count} SHA-256 digests")
        for digest in chunks.sha256:
            check_digest(digest, "chunk sha256")

    def with_chunks(self, artifact: bytes, chunk_size: int | None = None) -> Manifest:
        """This manifest with the chunk list of ``artifact``; call it before signing.

        ``chunk_size`` defaults to ``chunking.chunk_size_for`` the artifact. Raise
        VerificationError unless ``artifact`` is exactly the files this manifest names.
        """
        split_artifact(artifact, self)  # the list must describe these files, no others
        size = chunking.chunk_size_for(len(artifact)) if chunk_size is None else chunk_size
        _check_chunk_size(size)
        listed = ChunkList(size, chunking.chunk_hashes(artifact, size))
        out = replace(self, chunks=listed)
        out.validate()
        return out

    def check_chunks(self, artifact: bytes) -> None:
        """Raise VerificationError unless the chunk list is present and describes ``artifact``
        (for a manifest signed elsewhere, e.g. offline by an operator)."""
        if self.chunks is None:
            raise VerificationError("the manifest carries no chunk list")
        if self.with_chunks(artifact, self.chunks.size).chunks != self.chunks:
            raise VerificationError("the manifest's chunk list does not match the artifact")

    def file(self, role: str) -> FileEntry:
        for f in self.files:
            if f.role == role:
                return f
        raise KeyError(role)

    def has_file(self, role: str) -> bool:
        return any(f.role == role for f in self.files)

    @property
    def artifact_size(self) -> int:
        return sum(f.size for f in self.files)


def _is_number(value: object) -> bool:
    return is_finite_number(value)


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > 256:
        raise InvalidInputError(f"manifest {what} must be a string (at most 256 characters)")
    return value


def _check_tensor_spec(spec: TensorSpec) -> None:
    _check_text(spec.name, "tensor name")
    if not isinstance(spec.datatype, str) or spec.datatype not in V2_TO_NUMPY:
        raise InvalidInputError(f"tensor {spec.name!r}: unknown V2 datatype {spec.datatype!r}")
    shape = spec.shape
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise InvalidInputError(f"tensor {spec.name!r}: shape must be a list of dimensions")
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or not -1 <= dim <= MAX_RELEASE:
            raise InvalidInputError(f"tensor {spec.name!r}: bad dimension {dim!r} (-1: dynamic)")


def _check_chunk_size(size: object) -> int:
    if not isinstance(size, int) or not chunking.MIN_CHUNK_SIZE <= size <= chunking.MAX_CHUNK_SIZE:
        raise InvalidInputError(f"bad chunk size {size!r}")
    return size


def _chunk_list(doc: Any) -> ChunkList | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise InvalidInputError("malformed manifest: 'chunks' must be an object")
    return ChunkList(**doc)


@dataclass(frozen=True)
class SignedManifest:
    manifest: Manifest
    signature: str
    key_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest.to_dict(),
            "signature": self.signature,
            "key_id": self.key_id,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SignedManifest:
        try:
            return cls(Manifest.from_dict(doc["manifest"]), doc["signature"], doc["key_id"])
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"malformed signed manifest: {exc}") from exc

    @classmethod
    def sign(cls, manifest: Manifest, signer: Signer) -> SignedManifest:
        return cls(manifest, signer.sign(manifest.to_dict()), signer.key_id)

    def verify(self, trust: TrustStore, *, purpose: Purpose = "manifest") -> None:
        """``purpose="installed"``: re-check a package this host accepted earlier (TrustStore)."""
        trust.verify(self.manifest.to_dict(), self.signature, self.key_id, purpose=purpose)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path, role: str) -> FileEntry:
    return FileEntry(path.name, path.stat().st_size, sha256_file(path), role)


def write_package(directory: Path, signed: SignedManifest) -> None:
    """Write ``manifest.json`` next to the files it names (already in ``directory``)."""
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(signed.to_dict(), indent=2, sort_keys=True))
    tmp.replace(directory / MANIFEST_FILE)


def write_unsigned(directory: Path, manifest: Manifest) -> Path:
    """Write the manifest of a package that is ready to publish (signing happens on upload)."""
    path = directory / UNSIGNED_MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return path


def read_unsigned(directory: Path) -> Manifest:
    try:
        doc = json.loads((directory / UNSIGNED_MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"{directory} has no readable {UNSIGNED_MANIFEST_FILE} "
            f"(make one with `fogline model package`): {exc}"
        ) from exc
    return Manifest.from_dict(doc)


def read_package(
    directory: Path, trust: TrustStore | None = None, *, purpose: Purpose = "manifest"
) -> SignedManifest:
    """Read and check a package dir: the signature (if ``trust``) and every file's digest."""
    try:
        doc = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read manifest in {directory}: {exc}") from exc
    signed = SignedManifest.from_dict(doc)
    if trust is not None:
        signed.verify(trust, purpose=purpose)
    for f in signed.manifest.files:
        path = directory / f.name
        if not path.is_file() or path.stat().st_size != f.size or sha256_file(path) != f.sha256:
            raise VerificationError(f"{path}: size or SHA-256 does not match the manifest")
    return signed


def artifact_bytes(directory: Path, manifest: Manifest) -> bytes:
    """The artifact: the package's files concatenated in manifest order."""
    return b"".join((directory / f.name).read_bytes() for f in manifest.files)


def artifact_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_artifact(data: bytes, manifest: Manifest) -> dict[str, bytes]:
    """Split an artifact back into files, checking each against the manifest."""
    if len(data) != manifest.artifact_size:
        raise VerificationError(
            f"artifact is {len(data)} bytes, the manifest says {manifest.artifact_size}"
        )
    out: dict[str, bytes] = {}
    offset = 0
    for f in manifest.files:
        blob = data[offset : offset + f.size]
        offset += f.size
        if hashlib.sha256(blob).hexdigest() != f.sha256:
            raise VerificationError(f"file {f.name!r} does not match its SHA-256 in the manifest")
        out[f.name] = blob
    return out
