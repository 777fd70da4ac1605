# syntax=docker/dockerfile:1
# A cloud worker (`edgefed cloud worker`): serves verified artifacts from the controller's store
# to a pool's requests. It needs only the serving engine (ONNX Runtime, tokenizers, httpx,
# psutil), which is exactly the `edge` extra: no torch, FastAPI or SQLAlchemy in this image.
# Build from the repository root:
#   docker build -f manifests/images/worker.Dockerfile -t ghcr.io/edgefed/edgefed-worker:0.1.0 .

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
RUN groupadd --gid 10001 edgefed \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin edgefed
COPY --from=build /opt/edgefed /opt/edgefed
ENV PATH=/opt/edgefed/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 9465
ENTRYPOINT ["edgefed"]
CMD ["cloud", "worker"]
