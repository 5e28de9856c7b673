#!/usr/bin/env bash
# Set up everything the test suite needs, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
# A real headless browser for the web page test (Debian's chromium); skipped with a reason if
# it cannot be installed (not root, no apt).
if [ ! -x /usr/bin/chromium ] && command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
  echo "test: installing chromium for the browser test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null) \
    || echo "test: chromium could not be installed; the browser test will be skipped" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
