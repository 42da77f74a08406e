# Trainer image: every stage command of the DAG (`facial-r1 <stage> ...`) runs in it, as a pod or
# job; the inference image is built on it. Its Python environment is exactly requirements/gpu.lock
# (wheels only: torch 2.14.0 built for CUDA 13.0, the version vLLM pins; vLLM; transformers/trl
# inside vLLM's range), then requirements/gpu-sdist.lock (DeepSpeed, rouge-score: source only on
# PyPI, built without any compiler: DS_BUILD_OPS=0, DeepSpeed's ops compile at run time when
# used; ZeRO-3 without offload uses none), then our packages without dependencies.
# No flash-attn: the models use PyTorch SDPA (configs/qwen2.5-vl-7b.yaml model.attn_implementation).
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/facial-r1/trainer:0.1.0-cu130 .
# Base images are pinned by tag (digests are not resolvable offline; pin them with
# `docker buildx imagetools inspect` when building). Never deploy :latest.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu22.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/workspace/.cache/huggingface \
    FACIAL_R1_HOME=/workspace

# CPython 3.11 (a standalone build, no apt packages) and the venv.
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install 3.11.18 && uv venv --python 3.11.18 /opt/venv

# Exactly the lock: no resolution, no dependency pulled in from elsewhere, wheels only.
COPY requirements/gpu.lock requirements/gpu-sdist.lock /tmp/requirements/
RUN uv pip install --no-deps --only-binary :all: -r /tmp/requirements/gpu.lock \
 && DS_BUILD_OPS=0 uv pip install --no-deps --no-build-isolation \
      -r /tmp/requirements/gpu-sdist.lock

COPY packages/ /opt/facial-r1/packages/
RUN uv pip install --no-deps /opt/facial-r1/packages/core /opt/facial-r1/packages/data \
      /opt/facial-r1/packages/training /opt/facial-r1/packages/pipeline
COPY configs/ /opt/facial-r1/configs/

# Non-root (uid 1000 = resources.run_as_user); /workspace is the shared volume.
RUN useradd --uid 1000 --user-group --create-home --shell /bin/bash trainer \
 && mkdir -p /workspace && chown trainer:trainer /workspace
USER 1000
WORKDIR /workspace
CMD ["facial-r1", "--help"]
