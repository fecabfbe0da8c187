#!/usr/bin/env bash
# Create .venv (if missing) and install Fogline with the extra named in $1 (default: dev).
# Sourced by scripts/test.sh and scripts/demo.sh so both set up the same way.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extra="${1:-dev}"

if [[ ! -x .venv/bin/python ]]; then
    python=$(command -v python3.11 || command -v python3)
    "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# NOTE: torch goes in first and pinned (the CPU build), so that resolving the extras
# below finds it satisfied and never pulls some other torch build.
python -m pip install -q torch==2.13.0
# The venv's own setuptools builds the editable install: no isolated build env to fetch,
# so a rerun on a set-up venv needs no network.
python -m pip install -q 'setuptools>=68'
python -m pip install -q --no-build-isolation -e ".[${extra}]"
