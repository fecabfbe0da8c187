#!/usr/bin/env bash
# Set up .venv and run `fogline demo`; arguments go to the demo (e.g. --json, --keep-running).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh cloud >&2
# shellcheck disable=SC1091
. .venv/bin/activate
exec fogline demo "$@"
