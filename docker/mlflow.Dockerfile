# MLflow tracking server + registry with the basic-auth app (PostgreSQL backend store and auth
# database, S3-compatible artifact store). Base pinned by tag (digest: pin it when building).
#   docker build -f docker/mlflow.Dockerfile -t ghcr.io/facial-r1/mlflow:0.1.0 .
FROM python:3.11.14-slim-bookworm
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" psycopg2-binary==2.9.13 \
      boto3==1.44.18 \
 && useradd --uid 1000 --user-group --create-home mlflow
USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
ENV MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
ENTRYPOINT ["mlflow"]
CMD ["server", "--app-name", "basic-auth", "--host", "0.0.0.0", "--port", "5000", "--workers", "2"]
