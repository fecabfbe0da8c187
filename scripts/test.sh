#!/usr/bin/env bash
# The one test command (README, CI): set up .venv, then lint, format check, tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k broker -x`.
# mypy checks common/, edge/ and kernels/ (config in pyproject.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -x .venv/bin/python ]]; then
    python=$(command -v python3.11 || command -v python3)
    "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# NOTE: torch goes in first and pinned, so that resolving the extras below finds it
# satisfied and never pulls some other torch build.
python -m pip install -q torch==2.13.0
# The venv's own setuptools builds the editable install: no isolated build env to fetch,
# so a rerun on a set-up venv needs no network.
python -m pip install -q 'setuptools>=68'
python -m pip install -q --no-build-isolation -e '.[dev]'

ruff check .
ruff format --check .
mypy
python -m pytest -q "$@"
