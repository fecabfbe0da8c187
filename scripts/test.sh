#!/usr/bin/env bash
# The one test command (README, CI): set up .venv, then lint, format check, types, tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k broker -x`;
# `bash scripts/test.sh -m slow` runs the slow soak/scale tests instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh dev
# shellcheck disable=SC1091
. .venv/bin/activate

ruff check .
ruff format --check .
mypy
python -m pytest -q "$@"
