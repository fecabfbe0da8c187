"""Every model an agent holds: one ``ModelStore`` (A/B slots) per name, and the budget.

Layout of the state dir::

    models/{name}/slots/{a,b}/, models/{name}/active.json    one ModelStore per model
    releases.json                                            shared: keyed by model name

A state dir written before several models per agent (``slots/`` and
``active.json`` at its top) is moved into ``models/{name}/`` on the first
start, through ``models/.migrating`` so that a crash at any step resumes the
move at the next start instead of losing the model. Removing a model renames
its dir to ``models/.removed-*`` (one atomic step) before deleting it, so a
crash leaves either the whole model or none of it.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

from common.errors import InvalidInputError, StoreError
from common.fsutil import fsync_dir
from common.manifest import Manifest
from common.names import check_name, safe_join
from common.signing import TrustStore
from edge.model_store import ModelStore

logger = logging.getLogger(__name__)

MODELS_DIR = "models"
_MIGRATING = ".migrating"
_REMOVED = ".removed-"


class ModelLibrary:
    """The per-model stores under ``state_dir/models``."""

    def __init__(self, state_dir: Path, trust: TrustStore) -> None:
        self.state_dir = state_dir
        self.trust = trust
        self.models_dir = state_dir / MODELS_DIR
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.releases = state_dir / "releases.json"

    def names(self) -> list[str]:
        """Installed model names (dirs whose name passes the name check), sorted."""
        out = []
        for path in self.models_dir.iterdir():
            if path.is_dir() and not path.name.startswith("."):
                try:
                    out.append(check_name(path.name, "model name"))
                except InvalidInputError:
                    continue  # not ours: never a path built from it
        return sorted(out)

    def store(self, name: str) -> ModelStore:
        """The store of model ``name`` (created empty when new)."""
        return ModelStore(safe_join(self.models_dir, name), self.trust, releases=self.releases)

    def has(self, name: str) -> bool:
        return safe_join(self.models_dir, name).is_dir()

    def remove(self, name: str) -> None:
        """Delete a model's slots: renamed away first, so a crash never leaves half of it."""
        path = safe_join(self.models_dir, name)
        if not path.is_dir():
            raise StoreError(f"model {name!r} is not installed")
        doomed = self.models_dir / f"{_REMOVED}{uuid.uuid4().hex[:8]}"
        path.rename(doomed)
        fsync_dir(self.models_dir)
        shutil.rmtree(doomed, ignore_errors=True)

    def sweep(self) -> None:
        """Finish removals a crash interrupted, and staging leftovers in every store."""
        for leftover in self.models_dir.glob(f"{_REMOVED}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for name in self.names():
            self.store(name).sweep()

    # -- budget ------------------------------------------------------------------------

    def check_disk(self, manifest: Manifest, budget: int | None) -> None:
        """StoreError if installing ``manifest`` would put the models over ``budget`` bytes.

        The slot the deploy overwrites is not counted: its bytes go away first.
        """
        if budget is None:
            return
        used = sum(self.store(n).slot_bytes() for n in self.names() if n != manifest.name)
        if self.has(manifest.name):
            store = self.store(manifest.name)
            used += store.slot_bytes() - store.slot_bytes(store.staging_slot())
        need = sum(f.size for f in manifest.files)
        if used + need > budget:
            raise StoreError(
                f"disk budget exceeded: {manifest.name} {manifest.version} needs {need} bytes, "
                f"{used} of disk_budget_bytes={budget} are in use by installed models"
            )

    # -- migration ---------------------------------------------------------------------

    def migrate_legacy(self, fallback_name: str | None) -> str | None:
        """Move a single-model state dir into ``models/{name}/``; the name it got, if any.

        The name is the one the installed package was signed with (where its next
        deploy goes); ``fallback_name`` (the config's model) only when no slot is valid.
        """
        legacy = [self.state_dir / "slots", self.state_dir / "active.json"]
        tmp = self.models_dir / _MIGRATING
        if not tmp.exists() and not any(p.exists() for p in legacy):
            return None
        tmp.mkdir(exist_ok=True)
        for src in legacy:  # NOTE: each rename is atomic; a crash between them resumes here
            if src.exists():
                src.rename(tmp / src.name)
        fsync_dir(self.state_dir)
        fsync_dir(tmp)
        name = self._name_of(tmp) or fallback_name
        if name is None or self.has(name):
            logger.warning("legacy model state in %s: nothing to migrate into; removed", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        tmp.rename(safe_join(self.models_dir, name))
        fsync_dir(self.models_dir)
        logger.info("migrated the single-model state dir into %s/%s", MODELS_DIR, name)
        return name

    def _name_of(self, path: Path) -> str | None:
        store = ModelStore(path, self.trust, releases=self.releases)
        served = store.load_active()
        if served is None:
            for slot in ("a", "b"):
                served = store.open_slot(slot)
                if served is not None:
                    break
        return served.signed.manifest.name if served is not None else None
