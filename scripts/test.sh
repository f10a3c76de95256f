#!/usr/bin/env bash
# Installs (if needed) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
python -m pytest -q "$@"
