# MLflow tracking server + registry (PostgreSQL backend, S3-compatible artifact store).
#   docker build -f docker/mlflow.Dockerfile -t ghcr.io/facial-r1/mlflow:0.1.0 .
FROM python:3.11-slim
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" psycopg2-binary boto3 \
 && useradd --uid 1000 --create-home mlflow
USER 1000
EXPOSE 5000
ENV MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000", "--workers", "2"]
