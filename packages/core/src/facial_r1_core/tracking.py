"""Where runs are tracked: one function both environments use (mlflow or mlflow-skinny).

Resolution order for the tracking URI: ``MLFLOW_TRACKING_URI`` in the environment, then the
profile's ``mlflow.tracking_uri``. Relative ``sqlite:///`` paths and the artifact folder are made
absolute against the project home (:func:`project_home`: ``FACIAL_R1_HOME``, else the checkout
around the current folder, else the checkout these packages are installed from), so a command
started from any folder reads and writes the project's store. Readers (``facial-r1 analyze``)
use :func:`existing_tracking_uri`, which never creates an empty store.
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


class TrackingStoreError(FileNotFoundError):
    """The tracking store a reader needs does not exist (the message names the URI)."""


def _is_checkout(folder: Path) -> bool:
    return (folder / "configs").is_dir() and (folder / "packages" / "core").is_dir()


def project_home() -> Path:
    """The project root that relative profile paths resolve against.

    ``$FACIAL_R1_HOME``; else the nearest folder at or above the current one that is a checkout
    of this repository (``configs/`` and ``packages/core/``); else the checkout this package is
    installed from (an editable install); else the current folder.
    """
    given = os.environ.get("FACIAL_R1_HOME")
    if given:
        return Path(given).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if _is_checkout(folder):
            return folder
    source = Path(__file__).resolve().parents[4]  # <repo>/packages/core/src/facial_r1_core
    return source if _is_checkout(source) else here


def resolve_tracking_uri(config: Mapping[str, Any] | None = None, *, create: bool = True) -> str:
    """The tracking URI, with a relative SQLite path made absolute (its folder created unless
    ``create=False``).

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
        if create:
            db.parent.mkdir(parents=True, exist_ok=True)
        uri = prefix + str(db)
    return uri


def existing_tracking_uri(config: Mapping[str, Any] | None = None) -> str:
    """The tracking URI for reading; TrackingStoreError when it is a SQLite file that does not
    exist (MLflow would silently create an empty store there)."""
    uri = resolve_tracking_uri(config, create=False)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_file():
        raise TrackingStoreError(
            f"no MLflow tracking store at {uri} (project home {project_home()}): run an "
            "iteration first (`make demo`), set FACIAL_R1_HOME to the project folder or "
            "MLFLOW_TRACKING_URI to the store, or pass --model with a model folder"
        )
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
