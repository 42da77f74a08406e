"""Facial-R1 core: pure Python (no torch, no airflow), shared by every stage and environment."""

__version__ = "0.1.0"
