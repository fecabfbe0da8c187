"""A directory cache for files that take long to build and come out the same each time.

``fogline demo --model-cache DIR`` keeps the models it trains here: training is
seeded, so a second demo (or a second demo test) with the same seed and the same
training code gets the same files without training again.

An entry is a directory named by its key, renamed into place only once every file
is written, so a build killed half-way leaves nothing that looks like an entry. A
lock file per key makes a second builder wait for the first instead of building
the same files beside it. An entry that lacks a file (someone deleted it) is built
again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


def key_of(*parts: str | bytes, files: Iterable[Path] = ()) -> str:
    """A hex key over ``parts`` and the bytes of ``files`` (e.g. the source that builds)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    for path in files:
        data = path.read_bytes()
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:32]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def cached_build(
    cache: Path,
    key: str,
    names: tuple[str, ...],
    build: Callable[[Path], None],
    into: Path,
) -> bool:
    """Put the files ``names`` into ``into``: from ``cache`` if an entry for ``key``
    holds them all, else by ``build(directory)`` (which must write them there), keeping
    a copy in the cache. Returns True when they came from the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    entry = cache / key
    into.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f"{key}.lock"):
        if all((entry / name).is_file() for name in names):
            for name in names:
                shutil.copyfile(entry / name, into / name)
            logger.info("took %s from the cache %s", ", ".join(names), entry)
            return True
        build(into)
        missing = [name for name in names if not (into / name).is_file()]
        if missing:
            raise RuntimeError(f"the build did not write {', '.join(missing)}")
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
        try:
            for name in names:
                shutil.copyfile(into / name, staging / name)
            shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry, if any
            staging.rename(entry)
        except OSError as exc:  # a full disk: the build stands, only the cache is missed
            logger.warning("could not keep %s in the cache %s: %s", names, cache, exc)
            shutil.rmtree(staging, ignore_errors=True)
        return False
