#!/usr/bin/env bash
# Set up (scripts/setup.sh --test), lint with ruff, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Lint first: the rule set is in pyproject.toml ([tool.ruff.lint]); fix with `.venv/bin/ruff check --fix .`
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
