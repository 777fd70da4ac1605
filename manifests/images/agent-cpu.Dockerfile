# syntax=docker/dockerfile:1
# The edge agent for CPU nodes (x86-64 and arm64: build with --platform linux/arm64 for a
# Raspberry Pi class board): `edgefed[edge]`, the light install (ONNX Runtime CPU, no torch).
# mosquitto is installed for the agent's local endpoint (a private broker on loopback).
# Build from the repository root:
#   docker build -f manifests/images/agent-cpu.Dockerfile -t ghcr.io/edgefed/edgefed-agent:0.1.0 .

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/edgefed
ENV PATH=/opt/edgefed/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgefed ./edgefed
COPY common ./common
COPY cloud ./cloud
COPY edge ./edge
COPY simulation ./simulation
# This source tree at its own version; dependency ranges are pyproject.toml's.
# hadolint ignore=DL3013
RUN pip install ".[edge]"

FROM ${PYTHON_IMAGE}
# Debian's security updates replace package versions in place: pinning one would break the build
# the day it is superseded, so the distribution's current mosquitto is taken.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 edgefed \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin edgefed
COPY --from=build /opt/edgefed /opt/edgefed
ENV PATH=/opt/edgefed/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 9464
ENTRYPOINT ["edgefed"]
CMD ["edge", "run", "--state-dir", "/var/lib/edgefed"]
