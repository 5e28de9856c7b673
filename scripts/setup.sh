#!/usr/bin/env bash
# Create .venv and install the project into it (idempotent; re-runs when pyproject changes).
# Usage: scripts/setup.sh [EXTRA]   e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${extra:-base}"
if [ ! -f "$stamp" ]; then
  echo "setup: installing into .venv (first run only: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # The exact PyTorch pins these machines carry on local disk; a CUDA-capable build.
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".${extra:+[$extra]}"
  touch "$stamp"
fi
