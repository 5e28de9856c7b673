#!/usr/bin/env bash
# Set up everything the test suite needs, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
# checkov pins old packaging/networkx that clash with pytest: it gets a venv of its own.
if [ ! -x .venv-checkov/bin/checkov ]; then
  python3 -m venv .venv-checkov
  .venv-checkov/bin/python -m pip install -q "checkov==3.3.30" \
    || echo "test: checkov could not be installed; the security scan will be skipped" >&2
fi
export CHECKOV="$PWD/.venv-checkov/bin/checkov"
# Debian packages: a real headless browser for the web page test, promtool for the Prometheus
# config and dashboard queries, Java for TorchServe, tcmalloc (the service's allocator). Tests skip with a reason when they are missing (not root, no apt).
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v promtool > /dev/null || missing+=(prometheus)
command -v java > /dev/null || missing+=(openjdk-17-jre-headless)  # TorchServe interop test
ldconfig -p 2> /dev/null | grep -q libtcmalloc_minimal.so || missing+=(libtcmalloc-minimal4)  # MALLOC=auto
if [ ${#missing[@]} -gt 0 ] && command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
  echo "test: installing ${missing[*]} with apt-get" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null) \
    || echo "test: apt-get failed; the tests that need ${missing[*]} will be skipped" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
