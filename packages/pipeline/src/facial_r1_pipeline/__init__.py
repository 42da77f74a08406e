"""Facial-R1 pipeline: what the Airflow DAG needs (stage specs, runners, DVC, MLflow)."""
