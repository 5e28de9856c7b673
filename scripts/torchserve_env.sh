#!/usr/bin/env bash
# Make TorchServe 0.12 available, for the interop test and for the benchmark.
#
#   scripts/torchserve_env.sh               install into the project's .venv (what the test uses)
#   scripts/torchserve_env.sh --venv DIR    a separate venv DIR for TorchServe, layered over the
#                                           project's .venv (torch/torchvision/Pillow are shared
#                                           through a .pth file, not installed again), so its
#                                           pins never touch the project's environment;
#                                           DIR/bin/torchserve then starts workers with
#                                           DIR/bin/python (TorchServe uses the CLI's python)
#
# TorchServe's frontend needs Java 17: when `java` is missing and this runs as root with apt-get,
# openjdk-17-jre-headless is installed; otherwise a line says so and the test skips.
# Idempotent: a second run only checks. Prints the torchserve command it set up.
set -euo pipefail
cd "$(dirname "$0")/.."

# wheel<0.46: newer wheel releases require packaging>=24, which the project's pins may refuse;
# TorchServe only needs wheel to exist. torch-model-archiver is not needed (our trainer writes
# the .mar files; only TorchServe's LLM launcher imports the archiver).
pins=("torchserve==0.12.0" "wheel<0.46")
project_python=".venv/bin/python"
[ -x "$project_python" ] || { echo "torchserve_env: run scripts/setup.sh first (no .venv)" >&2; exit 1; }

target_python="$project_python"
if [ "${1:-}" = "--venv" ]; then
  dir="${2:?usage: scripts/torchserve_env.sh --venv DIR}"
  if [ ! -x "$dir/bin/python" ]; then
    "$project_python" -m venv --without-pip "$dir"
  fi
  project_site="$("$project_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  site="$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$project_site" > "$site/_project_venv.pth"
  target_python="$dir/bin/python"
fi

bin_dir="$(dirname "$target_python")"
if [ ! -x "$bin_dir/torchserve" ] \
  || ! "$target_python" -c 'import ts.version, sys; sys.exit(ts.version.__version__ != "0.12.0")' 2> /dev/null; then
  echo "torchserve_env: installing ${pins[*]} for $target_python" >&2
  torch_before="$("$target_python" -c 'import torch; print(torch.__version__)')"
  # --ignore-installed for torchserve alone: a layered venv must get its own copy and console
  # script even when the project's .venv already has one.
  "$target_python" -m pip install -q --ignore-installed --no-deps "${pins[0]}"
  "$target_python" -m pip install -q "${pins[@]}" psutil packaging Pillow
  torch_after="$("$target_python" -c 'import torch; print(torch.__version__)')"
  if [ "$torch_before" != "$torch_after" ]; then
    echo "torchserve_env: torch changed from $torch_before to $torch_after" >&2
    exit 1
  fi
fi
# TorchServe's worker imports yaml without declaring it (pyyaml is a project dependency).
"$target_python" -c 'import yaml, psutil' 2> /dev/null || "$target_python" -m pip install -q pyyaml psutil

if ! command -v java > /dev/null; then
  if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
    echo "torchserve_env: installing openjdk-17-jre-headless (TorchServe's frontend is Java)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      openjdk-17-jre-headless > /dev/null) \
      || echo "torchserve_env: Java could not be installed; TorchServe cannot run here" >&2
  else
    echo "torchserve_env: no java on PATH; install a Java 17 runtime to run TorchServe" >&2
  fi
fi
echo "$bin_dir/torchserve"
