#!/usr/bin/env bash
# Set up .venv from scratch and run lowbit's main job on the default model: fetch smollm2-135m,
# quantize it with GPTQ (4-bit, groups of 64), save the checkpoint to out/smol-w4g64, and evaluate
# it against its reference on WikiText-2 (first 8192 tokens), printing a short table.
# Data: $LOWBIT_DATA, else ../shared/data beside this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/pip install -q --disable-pip-version-check -e .
if [[ -z ${LOWBIT_DATA:-} && -d ../shared/data ]]; then
  export LOWBIT_DATA=$(cd ../shared/data && pwd)
fi
exec .venv/bin/lowbit quantize smollm2-135m --method gptq --bits 4 --group-size 64 \
  -o out/smol-w4g64 --force --eval wikitext2 --max-tokens 8192 "$@"
