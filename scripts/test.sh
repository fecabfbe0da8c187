#!/usr/bin/env bash
# The one test command (README, CI): set up .venv, then lint, format check, types, tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k broker -x`;
# `bash scripts/test.sh -m slow` runs the slow soak/scale tests instead.
# Tests run in parallel worker processes (pytest-xdist): most of them wait on
# subprocesses, brokers and sockets rather than on the CPU, so FOGLINE_TEST_WORKERS
# (default 4) workers beat one even on 2 cores. A module's tests stay together on one
# worker (--dist loadscope): they share module fixtures, and some run in file order;
# the longest modules go first (tests/conftest.py: LONG_MODULES).
# The slow tests time things and use every core: they run one at a time; `-n 0` in
# the arguments does that for any run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh dev
# The dashboard tests drive Debian's chromium through Playwright (no browser download).
# Install it where this user can; without it those tests skip and say why.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    echo "installing Debian's chromium for the dashboard tests" >&2
    { timeout 900 apt-get install -y -q chromium || { apt-get update -q && timeout 900 apt-get install -y -q chromium; }; } \
        >/dev/null 2>&1 || echo "could not install chromium: the browser tests will skip" >&2
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# Bytecode under .venv/pycache, never beside the sources: each pytest worker then reads
# the assertion-rewritten test modules instead of rewriting all ~300 itself (collection:
# 6 -> 3 CPU-s per worker), and that cache is filled while the linters run, when one of
# the two cores is idle. (This machine sets PYTHONDONTWRITEBYTECODE, which pytest obeys.)
export PYTHONPYCACHEPREFIX="$PWD/.venv/pycache"
unset PYTHONDONTWRITEBYTECODE
python -m pytest -q --collect-only -p no:cacheprovider >/dev/null 2>&1 &
warming=$!

ruff check .
ruff format --check .
mypy
wait "$warming" || true  # a collection error shows in the run below
workers=${FOGLINE_TEST_WORKERS:-4}
if [[ " $* " == *" -m "*slow* || " $* " == *" -mslow"* ]]; then
    workers=${FOGLINE_TEST_WORKERS:-0}
fi
python -m pytest -q -n "$workers" --dist loadscope --no-loadscope-reorder "$@"
