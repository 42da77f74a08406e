# Airflow image: the official Airflow 3 image + the Kubernetes provider + our light packages
# (core, pipeline: no torch) + the DAG. Stage work runs in trainer pods, not here.
#   docker build -f docker/airflow.Dockerfile -t ghcr.io/facial-r1/airflow:0.1.0 .
FROM apache/airflow:3.3.2-python3.11

COPY --chown=airflow:root requirements/orchestrator.lock /tmp/orchestrator.lock
# The lock pins Airflow itself too; keep the image's Airflow and add the rest.
RUN grep -v -E '^(apache-airflow|apache-airflow-core|apache-airflow-task-sdk)==' /tmp/orchestrator.lock \
      > /tmp/orchestrator.extra.lock \
 && pip install --no-cache-dir -r /tmp/orchestrator.extra.lock

COPY --chown=airflow:root packages/core /opt/facial-r1/packages/core
COPY --chown=airflow:root packages/pipeline /opt/facial-r1/packages/pipeline
RUN pip install --no-cache-dir --no-deps /opt/facial-r1/packages/core /opt/facial-r1/packages/pipeline
COPY --chown=airflow:root configs/ /opt/facial-r1/configs/
COPY --chown=airflow:root dags/ /opt/airflow/dags/

ENV FACIAL_R1_HOME=/opt/facial-r1 \
    FACIAL_R1_DEFAULT_RUNNER=kubernetes
USER 50000
