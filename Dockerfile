# syntax=docker/dockerfile:1
# kanmoe serving image: `kanmoe serve` on ONNX Runtime, no torch (the service loads ONNX only).
#
#   docker build -t kanmoe:gpu .                  # default target: CUDA 13 + cuDNN 9, onnxruntime-gpu
#   docker build -t kanmoe:cpu --target cpu .     # python:3.11-slim, onnxruntime (CPU)
#   docker run --gpus all -p 8000:8000 kanmoe:gpu
#
# onnxruntime-gpu 1.31 is built against CUDA 13 and cuDNN 9: keep ORT_GPU_VERSION and the CUDA
# base image in step. Each target installs exactly one ONNX Runtime build (the CPU and GPU
# packages unpack into the same directory; with both, CUDA silently disappears) and
# docker/check_env.py fails the build otherwise. The install line here is the one
# tests/test_serving_wheel.py runs natively: build the wheel, `pip install "<wheel>[serve]"`.

ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- wheel: build kanmoe's wheel from the sources (no dependencies installed here) --------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kanmoe/ kanmoe/
COPY model/ model/
COPY export/ export/
COPY service/ service/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# ---- cpu: python:3.11-slim + onnxruntime, for hosts without a GPU --------------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/kanmoe/bin:$PATH
COPY --from=wheel /dist/ /tmp/dist/
COPY docker/check_env.py docker/healthcheck.py /opt/kanmoe-tools/
# The venv belongs to root; the server runs as uid/gid 10001 (a numeric USER, so that
# Kubernetes' runAsNonRoot can verify it) and only reads the venv and /models.
RUN python -m venv /opt/kanmoe \
    && wheel="$(find /tmp/dist -name 'kanmoe-*.whl')" \
    && /opt/kanmoe/bin/pip install --no-cache-dir "${wheel}[serve]" \
    && /opt/kanmoe/bin/python /opt/kanmoe-tools/check_env.py --ort onnxruntime \
        --provider CPUExecutionProvider \
    && rm -rf /tmp/dist \
    && groupadd --system --gid 10001 kanmoe \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin kanmoe
COPY model_repository/ /models/
ENV KANMOE_HOST=0.0.0.0 \
    KANMOE_PORT=8000 \
    KANMOE_REPOSITORY=/models \
    KANMOE_WORKERS=1 \
    KANMOE_PROVIDERS=cpu \
    KANMOE_REQUIRE_GPU=false \
    KANMOE_LOG_LEVEL=info
WORKDIR /opt/kanmoe
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/kanmoe-tools/healthcheck.py"]
ENTRYPOINT ["kanmoe", "serve"]

# ---- gpu (default): CUDA runtime + cuDNN, onnxruntime-gpu -----------------------------------
FROM ${CUDA_IMAGE} AS gpu
ARG ORT_GPU_VERSION=1.31.1
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/kanmoe/bin:$PATH
# Ubuntu's python3 (3.12 on 24.04); its versions move with security updates, so they are not
# pinned (pinning would break the build once the archive drops the old version).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /dist/ /tmp/dist/
COPY docker/check_env.py docker/healthcheck.py /opt/kanmoe-tools/
# Same layout as the cpu target: root-owned venv, server as uid/gid 10001.
RUN python3 -m venv /opt/kanmoe \
    && wheel="$(find /tmp/dist -name 'kanmoe-*.whl')" \
    && /opt/kanmoe/bin/pip install --no-cache-dir "${wheel}[gpu]" \
        "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && /opt/kanmoe/bin/python /opt/kanmoe-tools/check_env.py --ort onnxruntime-gpu \
        --provider CUDAExecutionProvider \
    && rm -rf /tmp/dist \
    && groupadd --system --gid 10001 kanmoe \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin kanmoe
COPY model_repository/ /models/
# NVIDIA_* tell the NVIDIA container toolkit what to mount (the base image sets them too).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    KANMOE_HOST=0.0.0.0 \
    KANMOE_PORT=8000 \
    KANMOE_REPOSITORY=/models \
    KANMOE_WORKERS=1 \
    KANMOE_PROVIDERS=auto \
    KANMOE_REQUIRE_GPU=true \
    KANMOE_LOG_LEVEL=info
WORKDIR /opt/kanmoe
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
# CUDA initialisation and the warm-up batch take longer than on CPU: a longer start period.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/kanmoe-tools/healthcheck.py"]
ENTRYPOINT ["kanmoe", "serve"]
