"""Where the fallback's packages come from: pinned, a control plane, or a directory.

A source offers ``Candidate`` versions (its unverified word) and fetches one
into a package directory. Nothing a source says is trusted: the directory it
returns is verified (signature first, then every file) when it is loaded.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Protocol

from cloud.fallback.repository import Candidate
from cloud.fallback.settings import FallbackSettings
from cloud.package_cache import fetch_package, list_models, parse_model_ref
from common.errors import FoglineError, InvalidInputError
from common.manifest import MANIFEST_FILE, Manifest, SignedManifest
from common.names import check_name
from common.signing import TrustStore

logger = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1024**2
MAX_PACKAGES = 1000  # a directory source looks at no more package directories than this


class ModelSource(Protocol):
    async def offers(self) -> list[Candidate]: ...

    async def fetch(self, candidate: Candidate) -> Path: ...


def peek_manifest(directory: Path) -> Manifest:
    """A package's manifest, NOT verified: only to name what a later load will verify."""
    path = directory / MANIFEST_FILE
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise InvalidInputError(f"{path} is over {MAX_MANIFEST_BYTES} bytes")
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read manifest in {directory}: {exc}") from exc
    return SignedManifest.from_dict(doc).manifest


class PinnedSource:
    """``--package DIR`` and ``--model NAME:VERSION``: a fixed set, one version a model."""

    def __init__(self, settings: FallbackSettings, trust: TrustStore | None) -> None:
        if settings.models and not settings.control_url:
            raise InvalidInputError("--model needs --control (where to fetch it from)")
        self.settings, self.trust = settings, trust
        self._dirs: dict[str, Path] = {}

    async def offers(self) -> list[Candidate]:
        offered = []
        for directory in self.settings.packages:
            m = await asyncio.to_thread(peek_manifest, directory)
            key = f"dir:{directory}"
            self._dirs[key] = directory
            offered.append(Candidate(m.name, m.version, m.release, key))
        for ref in self.settings.models:
            name, version = parse_model_ref(ref)
            offered.append(Candidate(name, version, 0, f"ref:{ref}"))
        names = [c.name for c in offered]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise InvalidInputError(f"two packages serve model {dup!r}")
        return offered

    async def fetch(self, candidate: Candidate) -> Path:
        if candidate.key in self._dirs:
            return self._dirs[candidate.key]
        return await _fetch_from_control(self.settings, self.trust, candidate)


async def _fetch_from_control(
    settings: FallbackSettings, trust: TrustStore | None, candidate: Candidate
) -> Path:
    return await fetch_package(
        settings.control_url or "",
        candidate.name,
        candidate.version,
        variant=settings.variant,
        cache_dir=settings.cache_dir,
        trust=trust,
        token=settings.control_token,
    )


class ControlPlaneSource:
    """Every published version of the variant whose model name matches the pattern.

    Polls ``GET /api/models`` with the last ETag, so an unchanged registry costs a
    bodiless 304; fetches through the package cache (signature before any byte).
    """

    def __init__(self, settings: FallbackSettings, trust: TrustStore | None) -> None:
        self.settings, self.trust = settings, trust
        self.pattern = settings.model_pattern or "*"
        self._etag: str | None = None
        self._last: list[Candidate] = []

    async def offers(self) -> list[Candidate]:
        s = self.settings
        models, self._etag = await list_models(s.control_url or "", s.control_token, self._etag)
        if models is not None:
            self._last = [c for doc in models if (c := self._candidate(doc)) is not None]
        return self._last

    def _candidate(self, doc: Any) -> Candidate | None:
        try:
            if doc["variant"] != self.settings.variant:
                return None
            name = check_name(doc["name"], "model name")
            if not fnmatch.fnmatchcase(name, self.pattern):
                return None
            version = check_name(doc["version"], "model version")
            release, digest = doc["release"], doc["artifact"]["digest"]
            if not isinstance(release, int) or not isinstance(digest, str):
                raise TypeError("release or digest of the wrong type")
        except (KeyError, TypeError, FoglineError) as exc:
            logger.warning("ignoring a malformed model list entry: %s", exc)
            return None
        return Candidate(name, version, release, digest)

    async def fetch(self, candidate: Candidate) -> Path:
        return await _fetch_from_control(self.settings, self.trust, candidate)


class DirectorySource:
    """The signed packages under a directory that other tools keep in sync.

    A package is any directory, up to three levels down, holding ``manifest.json``
    (so ``DIR/pkg``, ``DIR/NAME/VERSION`` and the cache's ``DIR/NAME/VARIANT/VERSION``
    all work). A change to any of its files (mtime, size) makes it a new candidate,
    so a package that failed half-synced is tried again once the sync finishes.
    """

    def __init__(self, root: Path, variant: str) -> None:
        self.root, self.variant = root, variant
        self._dirs: dict[str, Path] = {}

    async def offers(self) -> list[Candidate]:
        found = await asyncio.to_thread(self._scan)
        self._dirs = {key: directory for key, (directory, _) in found.items()}
        return [c for _, c in found.values()]

    def _scan(self) -> dict[str, tuple[Path, Candidate]]:
        if not self.root.is_dir():
            raise InvalidInputError(f"--models-dir {self.root} is not a directory")
        found: dict[str, tuple[Path, Candidate]] = {}
        manifests = [
            p for depth in ("*", "*/*", "*/*/*") for p in self.root.glob(f"{depth}/{MANIFEST_FILE}")
        ]
        for path in sorted(manifests)[:MAX_PACKAGES]:
            directory = path.parent
            if directory.is_symlink() or not directory.resolve().is_relative_to(
                self.root.resolve()
            ):
                continue  # NOTE: nothing outside the watched directory is ever loaded
            try:
                m = peek_manifest(directory)
                name, version = check_name(m.name, "model name"), check_name(m.version, "version")
                key = _fingerprint(directory)
            except (FoglineError, OSError) as exc:  # half-synced, say: tried when it changes
                logger.debug("skipping %s: %s", directory, exc)
                continue
            if m.variant == self.variant:
                found[key] = (directory, Candidate(name, version, m.release, key))
        return found

    async def fetch(self, candidate: Candidate) -> Path:
        directory = self._dirs.get(candidate.key)
        if directory is None:
            raise InvalidInputError(
                f"{candidate.name} {candidate.version} is gone from the directory"
            )
        return directory


def _fingerprint(directory: Path) -> str:
    """Changes whenever a file of the package is replaced, grows or is touched."""
    h = hashlib.sha256(str(directory).encode())
    for entry in sorted(directory.iterdir()):
        st = entry.stat()
        h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:32]


def make_source(settings: FallbackSettings, trust: TrustStore | None) -> ModelSource:
    if settings.models_dir is not None:
        return DirectorySource(settings.models_dir, settings.variant)
    if settings.following:
        return ControlPlaneSource(settings, trust)
    return PinnedSource(settings, trust)
