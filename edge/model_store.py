"""A/B model slots on disk with an atomic switch.

Layout of one model's dir (``models/{name}/`` in the state dir, see
``edge.model_library``)::

    slots/a/, slots/b/     each a complete, verified package (manifest.json + files)
    active.json            {"slot": "a", "previous": "b" | null}; replaced atomically

and, shared by every model, ``releases.json`` in the state dir: the highest
release accepted per model name (rollback protection).

NOTE: the invariant that makes a crash at any instant safe: ``active.json``
only ever names a slot whose files were fully written and fsynced before the
pointer was replaced, and the active slot is never written to. Staging goes
to a temp dir that is renamed into the inactive slot, after the pointer has
stopped naming that slot as ``previous``.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from common.errors import InvalidInputError, ReplayError, StoreError, VerificationError
from common.fsutil import atomic_write, fsync_dir, write_durable
from common.manifest import SignedManifest, read_package, write_package
from common.signing import TrustStore

logger = logging.getLogger(__name__)

SLOTS = ("a", "b")
# Headroom kept free beyond the artifact itself (temp dir + the old slot).
SPACE_MARGIN_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class SlotModel:
    slot: str
    path: Path
    signed: SignedManifest

    @property
    def model_file(self) -> Path:
        return self.path / self.signed.manifest.file("model").name


class ModelStore:
    """The A/B slots of one model under ``root``."""

    def __init__(self, root: Path, trust: TrustStore, *, releases: Path | None = None) -> None:
        self.root = root
        self.trust = trust
        self.slots_dir = root / "slots"
        self.slots_dir.mkdir(parents=True, exist_ok=True)
        self._pointer = root / "active.json"
        self._releases = releases or root / "releases.json"

    # -- reading ---------------------------------------------------------------

    def _read_json(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            # Only written by atomic_write, so this means outside tampering.
            raise StoreError(f"{path} is corrupt: {exc}") from exc

    def open_slot(self, slot: str | None) -> SlotModel | None:
        if slot not in SLOTS:
            return None
        path = self.slots_dir / slot
        try:
            # "installed": a slot signed by a key retired since is still ours; a revoked one is not.
            signed = read_package(path, self.trust, purpose="installed")
            return SlotModel(slot, path, signed)
        except (InvalidInputError, VerificationError) as exc:
            logger.warning("slot %s is not a valid package: %s", slot, exc)
            return None

    def load_active(self) -> SlotModel | None:
        """The model to serve after a (re)start: the active slot, else the previous one."""
        pointer = self._read_json(self._pointer)
        for slot in (pointer.get("slot"), pointer.get("previous")):
            model = self.open_slot(slot)
            if model is not None:
                if slot != pointer.get("slot"):
                    logger.warning("active slot unusable; falling back to slot %s", slot)
                return model
        return None

    def active_slot(self) -> str | None:
        return self._read_json(self._pointer).get("slot")

    def staging_slot(self) -> str:
        """The slot the next ``stage`` overwrites (without changing anything)."""
        served = self.load_active()
        active = served.slot if served is not None else self.active_slot()
        return "b" if active == "a" else "a"

    def slot_bytes(self, slot: str | None = None) -> int:
        """Bytes on disk under one slot, or under the whole model dir."""
        base = self.root if slot is None else self.slots_dir / slot
        return sum(p.stat().st_size for p in base.rglob("*") if p.is_file())

    # -- rollback protection ------------------------------------------------------

    def check_release(self, signed: SignedManifest, *, allow_downgrade: bool = False) -> None:
        m = signed.manifest
        highest = int(self._read_json(self._releases).get(m.name, 0))
        if m.release < highest and not allow_downgrade:
            raise ReplayError(
                f"{m.name} release {m.release} is older than accepted release {highest}"
            )

    def _record_release(self, signed: SignedManifest) -> None:
        releases = self._read_json(self._releases)
        m = signed.manifest
        releases[m.name] = max(int(releases.get(m.name, 0)), m.release)
        atomic_write(self._releases, json.dumps(releases).encode())

    # -- staging and switching --------------------------------------------------

    def check_space(self, nbytes: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free < nbytes + SPACE_MARGIN_BYTES:
            raise StoreError(f"not enough disk: need {nbytes} bytes + margin, {free} free")

    def stage(self, signed: SignedManifest, files: dict[str, bytes]) -> SlotModel:
        """Write a verified package into the inactive slot and return it (not active yet)."""
        target = self._staging_target()
        tmp = self.slots_dir / f".staging-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for f in signed.manifest.files:
                write_durable(tmp / f.name, files[f.name])
            write_package(tmp, signed)
            fsync_dir(tmp)
            final = self.slots_dir / target
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(self.slots_dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"cannot stage {signed.manifest.name}: {exc}") from exc
        staged = self.open_slot(target)
        if staged is None:
            raise StoreError(f"staged slot {target} failed verification")
        return staged

    def _staging_target(self) -> str:
        """The slot to overwrite: never the one being served, whatever the pointer says.

        After a fall-back (active slot damaged) the served slot is the pointer's
        ``previous``; staging "into the inactive slot" by the pointer alone would
        overwrite the only good model. So the pointer is first made to name the
        served slot with no rollback target, then the other slot is the target.
        """
        pointer = self._read_json(self._pointer)
        served = self.load_active()
        active = served.slot if served is not None else pointer.get("slot")
        target = "b" if active == "a" else "a"
        if pointer.get("slot") != active or pointer.get("previous") == target:
            # The slot we are about to overwrite stops being named first (NOTE: crash safety).
            atomic_write(self._pointer, json.dumps({"slot": active, "previous": None}).encode())
        return target

    def activate(self, staged: SlotModel) -> None:
        """Switch the pointer to ``staged``; the old active slot becomes ``previous``."""
        active = self.active_slot()
        previous = active if active != staged.slot else None
        self._record_release(staged.signed)
        atomic_write(
            self._pointer, json.dumps({"slot": staged.slot, "previous": previous}).encode()
        )
        logger.info(
            "activated %s %s in slot %s",
            staged.signed.manifest.name,
            staged.signed.manifest.version,
            staged.slot,
        )

    def previous(self) -> SlotModel:
        """The rollback target: the slot that was active before the current one."""
        pointer = self._read_json(self._pointer)
        previous = self.open_slot(pointer.get("previous"))
        if previous is None:
            raise StoreError("no previous model to roll back to")
        return previous

    def sweep(self) -> None:
        """Remove staging leftovers of a crash (never a slot)."""
        for leftover in self.slots_dir.glob(".staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
