"""infra/: every kustomize overlay renders offline (kubectl kustomize) and validates strictly."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from facial_r1_pipeline import k8s

OVERLAYS = ("production", "dev", "production-vllm")


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request, repo):
    kubectl = shutil.which("kubectl")
    assert kubectl, (
        "this test renders infra/overlays with `kubectl kustomize` and needs the kubectl binary "
        "on PATH; `make setup` does not install it (no registry package ships a pinned kubectl): "
        "install kubectl from your distribution or the Kubernetes release page, then rerun"
    )
    proc = subprocess.run(
        [kubectl, "kustomize", str(repo / "infra/overlays" / request.param)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs
    return request.param, docs


def _pod_specs(doc):
    kind = doc["kind"]
    if kind in ("Deployment", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "Pod":
        return [doc["spec"]]
    return []


def test_strict_schema(rendered):
    _, docs = rendered
    for doc in docs:
        assert k8s.validate_strict(doc) == [], (doc["kind"], doc["metadata"]["name"])


def test_workloads_are_pinned_non_root_and_sized(rendered):
    _, docs = rendered
    workloads = [d for d in docs if _pod_specs(d)]
    assert workloads
    for doc in workloads:
        for spec in _pod_specs(doc):
            assert spec["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
            for c in spec["containers"]:
                assert k8s.image_problem(c["image"]) == "", c["image"]
                res = c["resources"]
                assert res["requests"] and res["limits"]["memory"]
                gpu_req = res["requests"].get(k8s.GPU)
                assert gpu_req == res["limits"].get(k8s.GPU)
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                for env in c.get("env", []):
                    if k8s.CREDENTIAL_WORDS.search(env["name"]):
                        assert "valueFrom" in env and "value" not in env, env["name"]


def test_overlay_contents(rendered):
    name, docs = rendered
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("PersistentVolumeClaim", "facial-r1-workspace") in kinds
    assert ("Role", "facial-r1-stage-launcher") in kinds
    assert ("Deployment", "mlflow") in kinds and ("Deployment", "airflow-scheduler") in kinds
    if name == "production":
        assert ("ResourceQuota", "facial-r1-gpus") in kinds
        job = next(d for d in docs if d["kind"] == "Job")
        spec = job["spec"]["template"]["spec"]
        assert spec["containers"][0]["resources"]["limits"][k8s.GPU] == "1"
        assert spec["tolerations"] and spec["nodeSelector"]
    for doc in docs:
        if doc["kind"] != "Namespace" and "namespace" in doc["metadata"]:
            assert doc["metadata"]["namespace"] == "facial-r1"
