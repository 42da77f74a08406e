"""infra/: the serving Deployments (MLflow scoring server on CPU; vLLM on a GPU) are wired right."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from facial_r1_pipeline import k8s

#: overlay -> (serving Deployment, container port, GPUs)
SERVING = {
    "dev": ("facial-r1-serve", 8080, 0),
    "production": ("facial-r1-serve", 8080, 0),
    "production-vllm": ("facial-r1-serve-vllm", 8000, 1),
}


def render(repo, overlay: str) -> list[dict]:
    proc = subprocess.run(
        [shutil.which("kubectl"), "kustomize", str(repo / "infra/overlays" / overlay)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.mark.parametrize("overlay", sorted(SERVING))
def test_serving_deployment_and_service(repo, overlay):
    name, port, gpus = SERVING[overlay]
    docs = render(repo, overlay)
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deploy, service = objects[("Deployment", name)], objects[("Service", name)]
    pod = deploy["spec"]["template"]
    # the Service reaches the pods, on the port the probes use
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [container] = pod["spec"]["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in ("/ping", "/health"), probe
        assert container[probe]["httpGet"]["port"] == "http", probe
    # the champion comes from the registry, with credentials from Secrets only
    env = {e["name"]: e for e in container["env"]}
    assert env["MODEL_URI"]["value"] == "models:/facial-r1@champion"
    assert "configMapKeyRef" in env["MLFLOW_TRACKING_URI"]["valueFrom"]
    assert "secretKeyRef" in env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]
    # non-root, no token, sized; GPU requests = limits
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    res = container["resources"]
    assert res["requests"]["cpu"] == res["limits"]["cpu"] and res["limits"]["memory"]
    assert int(res["limits"].get(k8s.GPU, 0)) == gpus == int(res["requests"].get(k8s.GPU, 0))
    if gpus:
        assert pod["spec"]["nodeSelector"] and pod["spec"]["tolerations"]
    else:
        assert "mlflow" in container["command"] and "serve" in container["args"]
        assert "--env-manager=local" in container["args"]
    assert k8s.validate_strict(deploy) == [] and k8s.validate_strict(service) == []
