"""Kubernetes runner: the stage runs as a pod or job of the pinned trainer image.

The operator comes from :func:`facial_r1_pipeline.k8s.build_operator` (the same builder the
offline tests render and validate). The stage writes its result JSON to
``/airflow/xcom/return.json``; the operator's XCom sidecar hands it back and we check it against
the contract. Data and checkpoints live on the shared volume (``resources.workspace_pvc``) at the
same relative paths as in a local run, so the DAG's wiring does not change.

While the stage runs, killing the Airflow task deletes its pod or job (see ``ownership``).

Not run on this machine (no cluster): see docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..k8s import KubeSettings, build_operator
from ..specs import StageSpec
from .base import StageError, check_result
from .ownership import owned


class KubernetesRunner:
    def __init__(self, profile: Mapping[str, Any], profile_file: str):
        self.settings = KubeSettings.from_profile(profile)
        self.profile_file = profile_file

    def operator(self, spec: StageSpec):
        return build_operator(spec, self.settings, self.profile_file)

    def run(self, spec: StageSpec, context: Any = None) -> dict[str, Any]:
        if context is None:
            raise StageError(
                f"{spec.stage}: the Kubernetes runner needs the Airflow task context",
                stage=spec.stage,
            )
        op = self.operator(spec)
        # The task's on_kill calls the provider operator's on_kill: it deletes the pod, or the
        # job and its pods, through the Kubernetes API (nothing keeps running unattended).
        with owned(f"{spec.stage} ({spec.resources.kind} {op.name})", op.on_kill):
            result = op.execute(context)
        if isinstance(result, list):  # a job returns one result per pod; we run one pod
            if len(result) != 1:
                raise StageError(
                    f"{spec.stage}: expected one pod result, got {len(result)}", stage=spec.stage
                )
            result = result[0]
        return check_result(result, stage=spec.stage, source="pod XCom")
