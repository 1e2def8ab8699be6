#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: time to first token cold vs. warm from each tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvstacks demo "$@"
