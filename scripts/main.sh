#!/usr/bin/env bash
# The main job on the default model and data: fetch smollm2-135m, then early-exit SST-2
# (4-shot, first 200 dev examples) with the full model, AdaInfer (SVM and CRF stoppers)
# and RAEE (reliability-weighted and the paper's rule), side by side: a table of quality,
# layers saved and wall-clock speedup, a sweep plot and JSON under runs/.
# (`earlyexit heads train` additionally trains the general WikiText exit readouts, ~10 min.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
mkdir -p runs
.venv/bin/earlyexit models fetch smollm2-135m
.venv/bin/earlyexit models fetch minilm-l6
.venv/bin/earlyexit eval --model smollm2-135m --task sst2 --limit 200 \
  --method full,confidence:0.9,adainfer,adainfer-crf,raee,raee-paper \
  --plots runs/plots --json runs/eval-sst2.json
