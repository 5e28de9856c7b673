# syntax=docker/dockerfile:1
#
# imgserve: the `service` inference server (and the `trainer` CLI) in one image.
#
#   docker build -t imgserve:0.1.0-cuda .                          # default: CUDA
#   docker build --build-arg VARIANT=cpu -t imgserve:0.1.0-cpu .   # CPU only, much smaller
#
# Stages: base-cuda | base-cpu  ->  build (venv with the project)  ->  runtime (base + venv, non-root).
# The runtime stage carries no compiler, no pip cache, no source tree and no tests.

# "cuda" (needs the NVIDIA Container Toolkit on the host) or "cpu".
ARG VARIANT=cuda

# --- CUDA base: the official PyTorch runtime image, PINNED by tag (PyTorch 2.8.0, CUDA 12.8,
# cuDNN 9; torch and torchvision preinstalled in /opt/conda). Pin a digest in your registry
# mirror if you need bit-for-bit rebuilds.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime AS base-cuda

# --- CPU base: slim Debian Python (pinned by tag) plus the CPU-only torch wheels.
FROM python:3.11.13-slim-bookworm AS base-cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --no-cache-dir \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        --index-url https://download.pytorch.org/whl/cpu

# --- build: a venv that sees the base's torch (--system-site-packages) and holds the project.
# DL3006 / CKV_DOCKER_7 (untagged FROM): base-${VARIANT} names a stage of this file (base-cuda
# or base-cpu, both pinned above); the linters cannot resolve the build argument.
# checkov:skip=CKV_DOCKER_7: FROM base-${VARIANT} is a stage of this file, both of whose bases are pinned by tag
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv --system-site-packages /opt/venv
WORKDIR /src
# Dependencies first, so that a source change does not reinstall them: install the project's
# dependencies from pyproject.toml against empty package stubs, then drop the stub install.
COPY pyproject.toml README.md ./
RUN mkdir -p trainer service \
    && touch trainer/__init__.py service/__init__.py \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/pip uninstall --yes resnet-serving \
    && rm -rf trainer service build ./*.egg-info
COPY trainer ./trainer
COPY service ./service
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && /opt/venv/bin/python -I -c "import service, trainer, torch, torchvision"

# --- runtime (DL3006: same as above, a stage of this file)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="imgserve" \
      org.opencontainers.image.description="ResNet image classification server (FastAPI, dynamic batching, Grad-CAM)" \
      org.opencontainers.image.source="https://example.invalid/resnet-serving" \
      io.imgserve.variant="${VARIANT}"

COPY --from=build /opt/venv /opt/venv

# tcmalloc, which the service preloads by itself (MALLOC=auto, service/allocator.py): glibc's
# malloc unmaps big activations after every forward and faults them in again (ResNet-18, batch
# 16: ~20,000 page faults per forward). Ubuntu 24.04 renamed the package (t64 transition).
# DL3008: the distribution's current security-patched build, as for the base images' own packages.
# hadolint ignore=DL3008
RUN apt-get update \
    && (apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
        || apt-get install -y --no-install-recommends libtcmalloc-minimal4t64) \
    && rm -rf /var/lib/apt/lists/*

# A fixed, high, non-root UID/GID (10001) so Kubernetes can check runAsNonRoot and volumes can be
# chowned to it. /models (the model store) and /runs (trainer output) belong to it, so named
# volumes mounted there start out writable by the trainer.
RUN groupadd --system --gid 10001 app \
    && useradd --system --no-log-init --uid 10001 --gid app --create-home --home-dir /home/app app \
    && mkdir -p /models /runs \
    && chown app:app /models /runs

# Settings of the service (service/settings.py; the README's settings table). DEFAULT_MODEL,
# MAX_BATCH_SIZE, MAX_BATCH_DELAY_MS, MAX_QUEUE, REQUEST_TIMEOUT_S, MAX_CONCURRENT_EXPLAIN,
# TORCH_THREADS, GRACEFUL_TIMEOUT_S, API_KEY and ADMIN_API_KEY keep the service's own defaults
# unless set at run time (docker compose passes them through; Kubernetes sets them from a
# ConfigMap and a Secret). Keys are never baked into the image.
ENV MODEL_STORE=/models \
    HOST=0.0.0.0 \
    PORT=8000 \
    DEVICE=auto \
    LOG_FORMAT=json \
    MAX_UPLOAD_BYTES=26214400 \
    MAX_IMAGE_PIXELS=50000000 \
    MAX_IMAGES_PER_REQUEST=64
# Process environment: the venv first; caches under /tmp so a read-only root filesystem works.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/app \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache

USER 10001:10001
WORKDIR /home/app
VOLUME ["/models"]
EXPOSE 8000

# Liveness only (the process answers). Readiness (/readyz: the default model is loaded and warm)
# is what docker compose and Kubernetes gate traffic on.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]

# Exec form: `service` is PID 1 and receives SIGTERM itself; uvicorn then stops accepting
# connections and drains in-flight requests before exiting.
STOPSIGNAL SIGTERM
CMD ["service"]
