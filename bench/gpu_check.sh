#!/usr/bin/env bash
# Everything this project checks on a CUDA machine, in one go, inside a time budget:
#   bench/gpu_check.sh IMAGES_DIR OUT_DIR        (BUDGET_S: seconds in all, default 570)
# 1. the CUDA tests (tests/service/test_cuda.py: padded batches, fp32/bf16/fp16 against the CPU,
#    the service predicting and explaining on the GPU);
# 2. one service process against several on the one GPU (WORKERS=2, 4) and against two forward
#    threads (INFERENCE_WORKERS=2), at C=256 (bench compare): the levers left after nvjpeg,
#    which no GPU has measured yet, so they run first;
# 3. the GPU benchmark (python -m bench run --gpu: LIMIT, service, naive app; ResNet-50@224,
#    bf16, batches up to 128), trimmed to a few minutes;
# 4. where an image's time goes on the GPU (python -m bench.gpu_probe: the forward alone, H2D
#    copies, CPU decoding with 1..all threads, nvjpeg, the service's GPU decoding path);
# 5. a py-spy profile of the service under GPU load, if py-spy is on the PATH.
# OUT_DIR gets the benchmark's JSON and markdown, the probe's JSON and logs.tgz (every log);
# a step that fails or overruns leaves the others' results. Needs the project's Python
# dependencies (PYTHON, default python3) and a GPU, nothing else.
set -uo pipefail
images=$(realpath "${1:?usage: bench/gpu_check.sh IMAGES_DIR OUT_DIR}")
out=$(realpath "${2:?usage: bench/gpu_check.sh IMAGES_DIR OUT_DIR}")
py=${PYTHON:-python3}
budget=${BUDGET_S:-570}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
cores=$(nproc)
logs=$(mktemp -d)
step() { echo "gpu_check: $* (${SECONDS}s of ${budget}s)"; }
# seconds a step may take: its cap, or what the budget has left after a reserve for the rest
allow() { local left=$((budget - SECONDS - $2)); echo $((left < $1 ? (left > 5 ? left : 5) : $1)); }
gpu_settings=(DEVICE=cuda PRECISION=bf16 MAX_BATCH_SIZE=128 MAX_QUEUE=4096)
gpu_env=("${gpu_settings[@]}" PREPROCESS_THREADS="$cores")

step environment
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0))"
  echo "cores: $cores"
  lscpu | grep -E 'Model name|^CPU\(s\)'
} 2>&1 | tee "$logs/env.txt"

step "CUDA tests"
timeout "$(allow 150 330)" "$py" -m pytest tests/service/test_cuda.py -q -p no:cacheprovider \
  -o addopts="" -p no:warnings -rs > "$logs/cuda-tests.log" 2>&1
echo "gpu_check: CUDA tests exited $?"
tail -8 "$logs/cuda-tests.log"

step "ResNet-50 archive"
archive=$(timeout "$(allow 120 300)" "$py" -c "
from bench.archives import MODELS, ensure
from bench.config import CACHE
print(ensure(MODELS['r50'], CACHE))" 2> "$logs/archive.log" | tail -1)
echo "gpu_check: archive ${archive:-not built (see archive.log)}"

step "one process against several, and two forward threads, C=256"
# no PREPROCESS_THREADS here: each process's threads default to its share of the cores
shared=$(IFS=,; echo "${gpu_settings[*]}")
timeout "$(allow 150 250)" "$py" -m bench compare --model r50 --images "$images" \
  --variant "one:$shared" --variant "two-forwards:$shared,INFERENCE_WORKERS=2" \
  --variant "workers2:$shared,WORKERS=2" --variant "workers4:$shared,WORKERS=4" \
  --concurrency 256 --rounds 1 --duration 4 --warmup 3 --loadgen-procs 4 \
  > "$logs/compare.log" 2>&1
echo "gpu_check: compare exited $?"
tail -14 "$logs/compare.log"

step "GPU benchmark"
timeout "$(allow 200 100)" "$py" -m bench run --gpu --images "$images" --results-dir "$out" \
  --results-md "$out/RESULTS.md" --no-install-torchserve --targets limit,service,naive \
  --concurrency 1,32,256 --repeats 1 --duration 4 --warmup 2 --paired-rounds 0 \
  --capacity-probes 1,0.8 --label "gpu-$(hostname -s)" > "$logs/bench.log" 2>&1
echo "gpu_check: bench exited $?"
grep -E '^\| (limit|service|naive)|^LIMIT|capacity|^bench:' "$logs/bench.log" | tail -30

step "where the time goes"
env "${gpu_env[@]}" timeout "$(allow 50 3)" "$py" -m bench.gpu_probe "$archive" "$images" \
  --seconds 1.5 --out "$out/probe.json" > /dev/null 2> "$logs/probe.log"
echo "gpu_check: probe exited $?"
cat "$out/probe.json" 2> /dev/null || tail -20 "$logs/probe.log"

if command -v py-spy > /dev/null && [ $((budget - SECONDS)) -gt 40 ]; then
  step "py-spy profile of the service at C=256"
  args=()
  for setting in "${gpu_env[@]}"; do args+=(--set "$setting"); done
  timeout "$(allow 60 3)" "$py" -m bench profile --model r50 --concurrency 256 --duration 8 \
    --loadgen-procs 4 "${args[@]}" > "$logs/profile.log" 2>&1
  echo "gpu_check: profile exited $?"
  head -50 "$logs/profile.log"
fi
tar -czf "$out/logs.tgz" -C "$logs" . -C "$PWD/bench/.cache" logs profiles compare 2> /dev/null
step done
