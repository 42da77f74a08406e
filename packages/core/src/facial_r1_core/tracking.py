"""Where runs are tracked: one function both environments use (mlflow or mlflow-skinny).

Resolution order for the tracking URI: ``MLFLOW_TRACKING_URI`` in the environment, then the
profile's ``mlflow.tracking_uri``. Relative ``sqlite:///`` paths and the artifact folder are made
absolute against the repository root (``FACIAL_R1_HOME`` or the current directory), so a stage
started from any folder writes to the same store.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
DEFAULT_ARTIFACT_ROOT = "runs/mlartifacts"
DEFAULT_EXPERIMENT = "facial-r1"
DEFAULT_REGISTERED_MODEL = "facial-r1"


def project_home() -> Path:
    """The repository root used to resolve relative paths of the embedded default."""
    return Path(os.environ.get("FACIAL_R1_HOME") or os.getcwd()).resolve()


def resolve_tracking_uri(config: Mapping[str, Any] | None = None) -> str:
    """The tracking URI, with a relative SQLite path made absolute.

    >>> os.environ.pop("MLFLOW_TRACKING_URI", None) and None
    >>> resolve_tracking_uri({"mlflow": {"tracking_uri": "http://127.0.0.1:5000"}})
    'http://127.0.0.1:5000'
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (
        (config or {}).get("mlflow", {}).get("tracking_uri") or DEFAULT_TRACKING_URI
    )
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        db = project_home() / uri[len(prefix) :]
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = prefix + str(db)
    return uri


def artifact_root(config: Mapping[str, Any] | None = None) -> str | None:
    """Artifact location for new experiments (a local folder for the embedded default).

    Against a tracking server (``http(s)://``) a local folder is not used: ``None`` lets the
    server choose its own (proxied) artifact store, so clients need no access to its disk.

    >>> os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:5000"
    >>> artifact_root({"mlflow": {"artifact_root": "runs/mlartifacts"}}) is None
    True
    >>> artifact_root({"mlflow": {"artifact_root": "s3://bucket/artifacts"}})
    's3://bucket/artifacts'
    >>> del os.environ["MLFLOW_TRACKING_URI"]
    """
    root = (config or {}).get("mlflow", {}).get("artifact_root") or DEFAULT_ARTIFACT_ROOT
    if "://" in root:
        return root
    if resolve_tracking_uri(config).startswith(("http://", "https://")):
        return None
    path = Path(root)
    if not path.is_absolute():
        path = project_home() / path
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def configure_mlflow(config: Mapping[str, Any] | None = None) -> str:
    """Point mlflow at the profile's store and experiment; returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(config))
    name = (config or {}).get("mlflow", {}).get("experiment") or DEFAULT_EXPERIMENT
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = mlflow.create_experiment(name, artifact_location=artifact_root(config))
        except Exception:  # created concurrently by another stage
            experiment_id = mlflow.get_experiment_by_name(name).experiment_id
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def registered_model_name(config: Mapping[str, Any] | None = None) -> str:
    return (config or {}).get("mlflow", {}).get("registered_model") or DEFAULT_REGISTERED_MODEL
