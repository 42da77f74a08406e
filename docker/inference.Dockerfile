# Inference: the trainer image (same requirements/gpu.lock: vLLM, torch, transformers, mlflow)
# with another command. At start the version behind `models:/facial-r1@champion` is resolved in
# MLflow, its files fetched to /models/champion, then `vllm serve` runs it.
#   docker build -f docker/inference.Dockerfile \
#     --build-arg TRAINER_IMAGE=ghcr.io/facial-r1/trainer:0.1.0-cu130 \
#     -t ghcr.io/facial-r1/inference:0.1.0-cu130 .
ARG TRAINER_IMAGE=ghcr.io/facial-r1/trainer:0.1.0-cu130
FROM ${TRAINER_IMAGE}
USER 0
COPY docker/inference-entrypoint.sh /usr/local/bin/facial-r1-serve
RUN chmod 0755 /usr/local/bin/facial-r1-serve \
 && mkdir -p /models && chown 1000:1000 /models
USER 1000
ENV MODEL_URI=models:/facial-r1@champion
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/facial-r1-serve"]
