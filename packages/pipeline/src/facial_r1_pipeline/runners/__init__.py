"""Runners turn a :class:`~facial_r1_pipeline.specs.StageSpec` into a running stage.

- :class:`~facial_r1_pipeline.runners.local.LocalRunner`: a subprocess in the trainer environment
  (``.venv/bin/facial-r1``), output streamed to the task log, result JSON read back.
- :class:`~facial_r1_pipeline.runners.kubernetes.KubernetesRunner`: a KubernetesPodOperator or
  KubernetesJobOperator of the trainer image; the result comes back through the pod's XCom file.

Both return the stage's result dict (the stage contract), which the DAG passes on as XCom.
"""

from __future__ import annotations

from .base import RESULT_KEYS, StageError, check_result

__all__ = ["RESULT_KEYS", "StageError", "check_result", "get_runner"]


def get_runner(name: str, **kwargs):
    """``"local"`` or ``"kubernetes"``; other names are an error listing the known ones."""
    if name == "local":
        from .local import LocalRunner

        return LocalRunner(**kwargs)
    if name == "kubernetes":
        from .kubernetes import KubernetesRunner

        return KubernetesRunner(**kwargs)
    raise ValueError(f"unknown runner {name!r}; known: local, kubernetes")
