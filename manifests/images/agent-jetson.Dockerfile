# syntax=docker/dockerfile:1
# The edge agent for NVIDIA Jetson (Orin, JetPack 6 / L4T r36): ONNX Runtime GPU with the CUDA
# and TensorRT providers. Built ON or FOR linux/arm64 only (a Jetson, or
# `docker buildx build --platform linux/arm64` with QEMU), from the repository root:
#   docker buildx build --platform linux/arm64 -f manifests/images/agent-jetson.Dockerfile \
#     -t ghcr.io/edgefed/edgefed-agent-jetson:0.1.0 .
#
# The base must match the device's L4T release (`cat /etc/nv_tegra_release` on the device):
# r36.4 is JetPack 6.1/6.2 with CUDA 12.6, cuDNN 9 and TensorRT 10.3, which the ONNX Runtime GPU
# wheel links against. PyPI has no onnxruntime-gpu for L4T: it comes from NVIDIA's Jetson AI Lab
# index (ORT_INDEX_URL). edgefed needs Python >= 3.11 while L4T r36 (Ubuntu 22.04) ships 3.10:
# the index must hold a wheel for the Python below (PYTHON); where it has only cp310 wheels,
# build ONNX Runtime from source (--use_cuda --use_tensorrt, as jetson-containers does) and
# install that wheel instead (ORT_SPEC=/path/to/onnxruntime_gpu-....whl after a COPY).

ARG L4T_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0

FROM ${L4T_IMAGE} AS build
ARG PYTHON=python3.11
ARG ORT_INDEX_URL=https://pypi.jetson-ai-lab.io/jp6/cu126
ARG ORT_SPEC=onnxruntime-gpu==1.23.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends "${PYTHON}" "${PYTHON}-venv" \
    && rm -rf /var/lib/apt/lists/*
RUN "${PYTHON}" -m venv /opt/edgefed
ENV PATH=/opt/edgefed/bin:$PATH
# onnxruntime-gpu first, then edgefed without its `edge` extra (which would add the CPU
# onnxruntime over it: both write the same package folder), then the extra's light dependencies.
# ORT_SPEC pins the version (hadolint cannot see through the ARG).
# hadolint ignore=DL3013
RUN pip install --index-url "${ORT_INDEX_URL}" "${ORT_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgefed ./edgefed
COPY common ./common
COPY cloud ./cloud
COPY edge ./edge
COPY simulation ./simulation
# This source tree at its own version; dependency ranges are pyproject.toml's.
# hadolint ignore=DL3013
RUN pip install . "tokenizers>=0.19" "httpx>=0.27" "psutil>=5.9" \
    && python -c "import onnxruntime as ort; print(ort.get_available_providers())"

# The runtime keeps the L4T base: CUDA, cuDNN and TensorRT live in the image on JetPack 6 (the
# nvidia runtime mounts only the driver from the host).
FROM ${L4T_IMAGE}
ARG PYTHON=python3.11
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends "${PYTHON}" mosquitto \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 edgefed \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin edgefed
COPY --from=build /opt/edgefed /opt/edgefed
ENV PATH=/opt/edgefed/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 9464
ENTRYPOINT ["edgefed"]
CMD ["edge", "run", "--state-dir", "/var/lib/edgefed"]
