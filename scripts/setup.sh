#!/usr/bin/env bash
# Creates .venv if missing and installs transrec with its test extras (torch and torchvision pinned together).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q -U pip
# torch and torchvision together first: pip must not swap torch under torchvision
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q -e '.[test]'
