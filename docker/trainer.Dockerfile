# Trainer image: CUDA + torch + transformers/trl/peft/accelerate + vLLM + our packages.
# Every stage command of the DAG runs in it (`facial-r1 <stage> ...`), as a pod or job.
# Build from the repository root (not built on the CPU-only development machine):
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/facial-r1/trainer:0.1.0-cu124 .
# Pin the tag in configs/<profile>.yaml resources.image; never deploy :latest.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/workspace/.cache/huggingface \
    FACIAL_R1_HOME=/workspace

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev git \
      build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, pinned, from the CUDA 12.4 index (an unpinned torch pulls whatever is newest).
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}" torchvision --index-url https://download.pytorch.org/whl/cu124

# The rest of the locked trainer environment (torch lines are skipped: installed above), then
# vLLM and DeepSpeed for the GPU profile, then flash-attn.
COPY requirements/trainer.lock /tmp/trainer.lock
RUN grep -v -E '^(torch|torchvision|nvidia-)' /tmp/trainer.lock > /tmp/trainer.nogpu.lock \
 && pip install -r /tmp/trainer.nogpu.lock \
 && pip install "vllm" "deepspeed" \
 && pip install flash-attn --no-build-isolation

COPY packages/ /opt/facial-r1/packages/
RUN pip install --no-deps /opt/facial-r1/packages/core /opt/facial-r1/packages/data \
      /opt/facial-r1/packages/training /opt/facial-r1/packages/pipeline
COPY configs/ /opt/facial-r1/configs/

# Non-root (uid 1000 = resources.run_as_user); /workspace is the shared volume.
RUN useradd --uid 1000 --create-home --shell /bin/bash trainer \
 && mkdir -p /workspace && chown trainer:trainer /workspace
USER 1000
WORKDIR /workspace
ENTRYPOINT []
CMD ["facial-r1", "--help"]
