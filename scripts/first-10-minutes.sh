#!/usr/bin/env bash
# The README's "first 10 minutes", run for real against `fogline demo --keep-running`:
# `bash scripts/first-10-minutes.sh [WORKDIR]` (after scripts/demo.sh has set up .venv).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../.venv/bin/activate"
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK" && cd "$WORK"
echo "working in $WORK (demo logs in $WORK/demo.log)" >&2
fogline demo --json --keep-running --no-hard-example-turn --samples 60 --workdir "$WORK/demo" > report.json 2> demo.log &
DEMO=$!
trap 'kill -INT $DEMO; wait $DEMO || true' EXIT
for i in $(seq 1 600); do [[ -s report.json ]] && break; sleep 1; done
export FOGLINE_CONTROL=$(python -c 'import json; print(json.load(open("report.json"))["endpoints"]["control"])')
export FOGLINE_TOKEN=$(python -c 'import json; print(json.load(open("report.json"))["tokens"]["operator"])')
echo "dashboard: $FOGLINE_CONTROL/#token=<operator token>"
fogline control devices
fogline model list
fogline model train --model digits-edge --seed 7 --out v2.onnx --data-out d.npz
fogline model package --model v2.onnx --data d.npz --name digits --version 2 --release 2 \
    --variant edge --precision fp32 --method train --out pkg2
fogline model publish --package pkg2
fogline model compress --fp32 v2.onnx --data d.npz --out v3-int8.onnx
fogline model package --model v3-int8.onnx --data d.npz --name digits --version 3 --release 3 \
    --variant edge --precision int8 --parent digits:2 --out pkg3
fogline model publish --package pkg3
fogline model lineage digits:3
fogline rollout create digits 3 --to all --stages 34%,100% --soak 10s --max-latency-increase 5 \
    --reason "second version" --watch --timeout 300
ID=$(fogline rollout list -o json | python -c 'import json,sys; print(json.load(sys.stdin)["rollouts"][0]["id"])')
fogline rollout status "$ID"
fogline rollout rollback "$ID" --reason "walkthrough: back to 1"
fogline rollout status "$ID" --watch --timeout 120 || true
fogline control devices
fogline audit
