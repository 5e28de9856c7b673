#!/usr/bin/env bash
# Set up, train the default model if the model store has no archive, then serve it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# tcmalloc: the service preloads it when installed (MALLOC=auto; fewer page faults per forward,
# service/allocator.py). Installed here where apt-get may be used; optional otherwise.
if ! ldconfig -p 2> /dev/null | grep -q libtcmalloc_minimal.so; then
  if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 > /dev/null) \
      || echo "serve: could not install libtcmalloc-minimal4; serving with the system allocator" >&2
  else
    echo "serve: libtcmalloc-minimal4 is not installed; serving with the system allocator" >&2
  fi
fi
store="${MODEL_STORE:-model_store}"
if ! compgen -G "$store/*.mar" > /dev/null; then
  echo "serve: $store has no archive; training the default digits ResNet-20 first (about 2 minutes on 2 cores)" >&2
  .venv/bin/trainer fit --dataset digits --arch resnet20 --archive digits --model-store "$store"
fi
export MODEL_STORE="$store"
exec .venv/bin/service
