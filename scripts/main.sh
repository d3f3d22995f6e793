#!/usr/bin/env bash
# The main job on the default model and data: fetch smollm2-135m, train its exit readouts
# (once; later runs load them), and print the per-layer readout report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
mkdir -p runs
.venv/bin/earlyexit models fetch smollm2-135m
if ! .venv/bin/python -c "
import sys
from earlyexit.paths import home
sys.exit(0 if (home() / 'readouts/smollm2-135m/default/readout.json').exists() else 1)"; then
  .venv/bin/earlyexit heads train --model smollm2-135m
fi
.venv/bin/earlyexit heads report --model smollm2-135m --json runs/readout-report.json
