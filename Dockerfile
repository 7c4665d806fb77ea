# syntax=docker/dockerfile:1
# sizewise serving image. One file, three accelerators, chosen with --build-arg BASE:
#   docker build -t sizewise .                                   # cpu (default): slim Python
#   docker build -t sizewise:cuda --build-arg BASE=cuda .        # NVIDIA CUDA runtime + CUDA torch
#   docker build -t sizewise:ascend --build-arg BASE=ascend .    # Ascend CANN + torch_npu
# The image serves the built-in demo family with nothing mounted; mount a model directory at
# /models and pass --config /models/<deployment>.yaml to serve your own (docs/serving.md: Docker).
ARG BASE=cpu

# ----- bases: each leaves python3 (with venv) on PATH; deploy/docker/torch-<BASE>.txt pins its torch
FROM python:3.11-slim-bookworm AS base-cpu

FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS base-cuda
# Ubuntu's python3.12; the versions are the ones this CUDA base's Ubuntu release ships.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# vllm-ascend's 2026 stack: CANN 9.1.0, torch 2.10.0 (CPU wheel) + torch-npu 2.10.0.post4.
FROM quay.io/ascend/cann:9.1.0-910b-ubuntu22.04-py3.12 AS base-ascend

# ----- build: a virtual environment with torch and sizewise, copied whole into the runtime -----
# base-${BASE} names a stage above, which hadolint cannot resolve through the argument.
# hadolint ignore=DL3006
FROM base-${BASE} AS build
ARG BASE
# Unset unless given; pip reads them from the environment: local wheels, a mirror, a proxy's CA
# bundle, fewer retries of an unreachable index (docs/serving.md: Docker).
ARG PIP_FIND_LINKS
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
ARG PIP_RETRIES
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/docker/torch-${BASE}.txt /tmp/torch-requirements.txt
RUN pip install --no-cache-dir --requirement /tmp/torch-requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .

# ----- runtime ---------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${BASE} AS runtime
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1
RUN useradd --create-home --uid 10001 --user-group sizewise \
    && mkdir -p /models && chown sizewise:sizewise /models
# The demo family and its config: `sizewise serve` finds configs/demo.yaml in its working directory.
WORKDIR /app
COPY --chown=sizewise:sizewise configs ./configs
COPY --chown=sizewise:sizewise models/demo ./models/demo
USER 10001
VOLUME ["/models"]
EXPOSE 8000
# Liveness: /health answers 200 while the process serves (503 once the engine died or loading failed).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
# Flags given to `docker run IMAGE ...` are appended: a later --host/--port wins over these.
ENTRYPOINT ["sizewise", "serve", "--host", "0.0.0.0"]
