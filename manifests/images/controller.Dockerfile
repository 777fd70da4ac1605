# syntax=docker/dockerfile:1
# The controller (`edgefed cloud serve`): control API, registry, rollouts, compression jobs.
# Build from the repository root:
#   docker build -f manifests/images/controller.Dockerfile -t ghcr.io/edgefed/edgefed-controller:0.1.0 .
# Multi-stage: the virtual environment is built with pip in the first stage and copied alone into
# a fresh slim image (no compilers, no pip cache). CPU torch (compression jobs) from PyTorch's CPU
# index: the default PyPI wheel would pull several GB of CUDA libraries the controller never uses.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/edgefed
ENV PATH=/opt/edgefed/bin:$PATH
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgefed ./edgefed
COPY common ./common
COPY cloud ./cloud
COPY edge ./edge
COPY simulation ./simulation
# This source tree at its own version; dependency ranges are pyproject.toml's.
# hadolint ignore=DL3013
RUN pip install ".[cloud]"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 edgefed \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin edgefed
COPY --from=build /opt/edgefed /opt/edgefed
ENV PATH=/opt/edgefed/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8443
ENTRYPOINT ["edgefed"]
CMD ["cloud", "serve", "--host", "0.0.0.0"]
