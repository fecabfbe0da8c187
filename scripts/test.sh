#!/usr/bin/env bash
# The one test command (README, CI): set up .venv, then lint, format check, types, tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k broker -x`;
# `bash scripts/test.sh -m slow` runs the slow soak/scale tests instead.
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

ruff check .
ruff format --check .
mypy
python -m pytest -q "$@"
