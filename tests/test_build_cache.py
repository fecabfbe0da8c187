"""``fogline.build_cache``: what ``fogline demo --model-cache`` keeps its trained models in."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from fogline.build_cache import cached_build, key_of

NAMES = ("a.onnx", "b.pt")


class Builder:
    """Writes NAMES with given contents; counts its calls; can stall or fail half-way."""

    def __init__(self, stall_s: float = 0.0, fail_after_first: bool = False) -> None:
        self.calls = 0
        self.stall_s = stall_s
        self.fail_after_first = fail_after_first

    def __call__(self, into: Path) -> None:
        self.calls += 1
        (into / NAMES[0]).write_bytes(b"first file")
        time.sleep(self.stall_s)
        if self.fail_after_first:
            raise KeyboardInterrupt("killed half-way")
        (into / NAMES[1]).write_bytes(b"second file")


def test_a_second_build_comes_from_the_cache_with_the_same_bytes(tmp_path: Path) -> None:
    build = Builder()
    assert cached_build(tmp_path / "cache", "k1", NAMES, build, tmp_path / "one") is False
    assert cached_build(tmp_path / "cache", "k1", NAMES, build, tmp_path / "two") is True
    assert build.calls == 1
    for name in NAMES:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    # Another key (another seed, changed training code) builds again.
    assert cached_build(tmp_path / "cache", "k2", NAMES, build, tmp_path / "three") is False
    assert build.calls == 2


def test_a_second_builder_waits_for_the_first_instead_of_building_too(tmp_path: Path) -> None:
    build = Builder(stall_s=0.5)
    got: dict[str, bool] = {}

    def run(name: str) -> None:
        got[name] = cached_build(tmp_path / "cache", "k", NAMES, build, tmp_path / name)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
        time.sleep(0.1)  # "x" holds the lock, "y" waits on it
    for t in threads:
        t.join(10)
    assert build.calls == 1
    assert sorted(got.values()) == [False, True]
    assert (tmp_path / "y" / NAMES[1]).read_bytes() == b"second file"


def test_a_build_killed_half_way_leaves_no_entry(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        cached_build(tmp_path / "cache", "k", NAMES, Builder(fail_after_first=True), tmp_path / "a")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k.lock"]
    build = Builder()
    assert cached_build(tmp_path / "cache", "k", NAMES, build, tmp_path / "b") is False
    assert build.calls == 1


def test_an_entry_that_lost_a_file_is_built_again(tmp_path: Path) -> None:
    build = Builder()
    cached_build(tmp_path / "cache", "k", NAMES, build, tmp_path / "a")
    (tmp_path / "cache" / "k" / NAMES[1]).unlink()
    assert cached_build(tmp_path / "cache", "k", NAMES, build, tmp_path / "b") is False
    assert build.calls == 2
    assert cached_build(tmp_path / "cache", "k", NAMES, build, tmp_path / "c") is True


def test_a_build_that_forgets_a_file_is_a_clear_error(tmp_path: Path) -> None:
    def lazy(into: Path) -> None:
        (into / NAMES[0]).write_bytes(b"only one")

    with pytest.raises(RuntimeError, match=r"did not write b\.pt"):
        cached_build(tmp_path / "cache", "k", NAMES, lazy, tmp_path / "a")
    assert not (tmp_path / "cache" / "k").exists()


def test_a_cache_that_cannot_be_written_only_costs_the_reuse(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "k").write_bytes(b"not a directory")  # the entry's place is taken
    build = Builder()
    with caplog.at_level(logging.WARNING):
        assert cached_build(cache, "k", NAMES, build, tmp_path / "a") is False
    assert (tmp_path / "a" / NAMES[1]).read_bytes() == b"second file"
    assert "could not keep" in caplog.text
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_the_key_covers_the_parts_and_the_files_bytes(tmp_path: Path) -> None:
    source = tmp_path / "train.py"
    source.write_text("EPOCHS = 30\n")
    before = key_of("seed=0", "2.13.0", files=[source])
    assert key_of("seed=0", "2.13.0", files=[source]) == before
    assert key_of("seed=1", "2.13.0", files=[source]) != before
    source.write_text("EPOCHS = 31\n")
    assert key_of("seed=0", "2.13.0", files=[source]) != before
    assert key_of("ab", "c") != key_of("a", "bc")  # parts are length-prefixed


def test_a_cache_path_that_is_a_file_is_a_clear_error_before_any_build(tmp_path: Path) -> None:
    """``--model-cache /etc/hostname``: the demo fails with this one line, nothing built."""
    cache = tmp_path / "not-a-dir"
    cache.write_text("x")
    build = Builder()
    with pytest.raises(FileExistsError, match="not-a-dir"):
        cached_build(cache, "k", NAMES, build, tmp_path / "a")
    assert build.calls == 0
