"""Kubernetes runner: the stage runs as a pod or job of the pinned trainer image.

The operator comes from :func:`facial_r1_pipeline.k8s.build_run_operator` (the same builder the
offline tests render and validate). The stage writes its result JSON to
``/airflow/xcom/return.json``; the operator's XCom sidecar hands it back and we check it against
the contract. Data and checkpoints live on the shared volume (``resources.workspace_pvc``) at the
same relative paths as in a local run, so the DAG's wiring does not change.

A multi-node stage (``resources.stages.<stage>.nodes`` > 1) is an Indexed Job whose pods find
each other through a headless Service, and GRPO in ``vllm_mode: server`` has a vLLM server
Deployment + Service beside it; those companions (and the NetworkPolicy that lets the run's
pods talk to each other) are created before the job and deleted after it, whatever happened.

While the stage runs, killing the Airflow task deletes its pod or job and its companions (see
``ownership``).

Not run on this machine (no cluster): see docs/operations.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from ..k8s import KubeSettings, build_run_operator, companion_objects
from ..specs import StageSpec
from .base import StageError, check_result
from .ownership import owned

log = logging.getLogger("facial_r1.pipeline.kubernetes")

#: kind -> (kubernetes client API class, method suffix) for the companion objects
_APIS = {
    "Service": ("CoreV1Api", "namespaced_service"),
    "Deployment": ("AppsV1Api", "namespaced_deployment"),
    "NetworkPolicy": ("NetworkingV1Api", "namespaced_network_policy"),
}


class CompanionClient:
    """Creates and deletes a stage run's companion objects through the Kubernetes API."""

    def __init__(self, api_client: Any):
        self.api_client = api_client

    def _call(self, verb: str, obj: Mapping[str, Any], **kwargs: Any) -> Any:
        from kubernetes import client

        cls_name, suffix = _APIS[obj["kind"]]
        api = getattr(client, cls_name)(self.api_client)
        return getattr(api, f"{verb}_{suffix}")(namespace=obj["metadata"]["namespace"], **kwargs)

    def create(self, obj: Mapping[str, Any]) -> None:
        """Create ``obj``; one left by an earlier attempt of the same run (same name, same
        content: names derive from the run) is kept (a retried task reattaches to it)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._call("create", obj, body=dict(obj))
        except ApiException as exc:
            if exc.status != 409:
                raise
            log.info("%s %s exists already: reusing it", obj["kind"], obj["metadata"]["name"])

    def delete(self, obj: Mapping[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._call("delete", obj, name=obj["metadata"]["name"], propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status != 404:
                raise


class KubernetesRunner:
    def __init__(self, profile: Mapping[str, Any], profile_file: str):
        self.profile = dict(profile)
        self.settings = KubeSettings.from_profile(profile)
        self.profile_file = profile_file

    def operator(self, spec: StageSpec):
        return build_run_operator(spec, self.settings, self.profile_file, self.profile)

    def companion_client(self, op) -> CompanionClient:
        return CompanionClient(op.hook.api_client)

    def run(self, spec: StageSpec, context: Any = None) -> dict[str, Any]:
        if context is None:
            raise StageError(
                f"{spec.stage}: the Kubernetes runner needs the Airflow task context",
                stage=spec.stage,
            )
        op = self.operator(spec)
        companions = companion_objects(spec, self.settings, self.profile)
        client = self.companion_client(op) if companions else None

        deleted: list[str] = []

        def delete_companions() -> None:  # once, whether killed or finished
            if deleted:
                return
            deleted.append("all")
            for obj in reversed(companions):
                try:
                    client.delete(obj)
                except Exception:
                    log.exception("could not delete %s %s", obj["kind"], obj["metadata"]["name"])

        def stop() -> None:
            # the provider operator's on_kill deletes the pod, or the job and its pods, through
            # the Kubernetes API; then the run's Services, vLLM server and NetworkPolicy go too
            try:
                op.on_kill()
            finally:
                delete_companions()

        what = f"{spec.stage} ({spec.resources.kind} {op.name})"
        with owned(what, stop), contextlib.ExitStack() as cleanup:
            if companions:
                cleanup.callback(delete_companions)
                for obj in companions:
                    client.create(obj)
            result = op.execute(context)
        if isinstance(result, list):  # a job returns one result per pod; rank 0's pod wrote it
            written = [r for r in result if r is not None]
            if len(written) != 1:
                raise StageError(
                    f"{spec.stage}: expected one pod result (rank 0), got {len(written)} of "
                    f"{len(result)} pods",
                    stage=spec.stage,
                )
            result = written[0]
        return check_result(result, stage=spec.stage, source="pod XCom")
