#!/usr/bin/env bash
# Set up, train the default model if the model store has no archive, then serve it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
store="${MODEL_STORE:-model_store}"
if ! compgen -G "$store/*.mar" > /dev/null; then
  echo "serve: $store has no archive; training the default digits ResNet-20 first (about 2 minutes on 2 cores)" >&2
  .venv/bin/trainer fit --dataset digits --arch resnet20 --archive digits --model-store "$store"
fi
export MODEL_STORE="$store"
exec .venv/bin/service
