# Inference: serve the registered champion with vLLM's OpenAI-compatible server.
# At start the model version behind `models:/facial-r1@champion` is resolved in MLflow and its
# files fetched to /models/champion, then `vllm serve` runs it (the prompt is the one of
# facial_r1_core.prompts; parse answers with facial_r1_core.parser).
#   docker build -f docker/inference.Dockerfile -t ghcr.io/facial-r1/inference:0.1.0 .
FROM vllm/vllm-openai:v0.11.0
RUN pip install --no-cache-dir "mlflow-skinny==3.17.2" boto3
COPY packages/core /opt/facial-r1/packages/core
RUN pip install --no-cache-dir --no-deps /opt/facial-r1/packages/core
COPY docker/inference-entrypoint.sh /usr/local/bin/facial-r1-serve
RUN useradd --uid 1000 --create-home serve && mkdir -p /models && chown serve /models
USER 1000
ENV MODEL_URI=models:/facial-r1@champion
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/facial-r1-serve"]
