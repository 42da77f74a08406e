"""The exact pod/job objects of the Kubernetes runner, rendered offline and validated."""

from __future__ import annotations

import copy

import pytest
import yaml
from facial_r1_core.config import load_profile
from facial_r1_pipeline import k8s
from facial_r1_pipeline.specs import STAGES, StageSpec, stage_resources

GPU = "nvidia.com/gpu"


@pytest.fixture(scope="module")
def gpu_profile(repo):
    return load_profile(repo / "configs" / "qwen2.5-vl-7b.yaml")


@pytest.fixture(scope="module")
def rendered(gpu_profile):
    return k8s.render_stages(gpu_profile, "configs/qwen2.5-vl-7b.yaml")


def _main(manifest):
    spec = manifest["spec"]["template"]["spec"] if manifest["kind"] == "Job" else manifest["spec"]
    return spec, spec["containers"][0]


def test_every_stage_renders_and_validates_strict(rendered, gpu_profile):
    assert set(rendered) == set(STAGES)
    for stage, manifest in rendered.items():
        expected = stage_resources(gpu_profile, stage).gpus
        assert k8s.check_manifest(manifest, expect_gpus=expected) == [], stage
        assert k8s.validate_strict(manifest) == [], stage
        # the manifests survive a YAML round trip unchanged (what `make k8s-render` writes)
        assert yaml.safe_load(yaml.safe_dump(manifest)) == manifest


def test_gpu_stage_details(rendered, gpu_profile):
    sft = rendered["sft"]
    assert sft["kind"] == "Job" and sft["spec"]["backoffLimit"] == 0
    spec, main = _main(sft)
    res = main["resources"]
    assert res["requests"][GPU] == res["limits"][GPU] == "8"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert any(
        v.get("persistentVolumeClaim", {}).get("claimName") == "facial-r1-workspace"
        for v in spec["volumes"]
    )
    assert main["image"] == gpu_profile["resources"]["image"] and ":latest" not in main["image"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    # multi-GPU stages go through accelerate with the profile's config baked into the image
    assert main["command"][:2] == ["accelerate", "launch"]
    assert "/opt/facial-r1/configs/accelerate/deepspeed_zero3.yaml" in main["command"]
    args = main["args"]
    assert args[0] == "sft" and "/airflow/xcom/return.json" in args
    assert args[args.index("--config") + 1] == "/opt/facial-r1/configs/qwen2.5-vl-7b.yaml"
    # credentials only through secretKeyRef, never literal values
    env = {e["name"]: e for e in main["env"]}
    for name in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["key"]
    # the XCom sidecar that returns the result is there and non-root too
    names = [c["name"] for c in spec["containers"]]
    assert "airflow-xcom-sidecar" in names


def test_cpu_stage_has_no_gpu_scheduling(rendered):
    spec, main = _main(rendered["filter"])
    assert GPU not in main["resources"]["limits"]
    assert not spec.get("nodeSelector") and not spec.get("tolerations")
    assert main["command"] == ["facial-r1"]


def test_gpu_override_from_params(gpu_profile):
    manifests = k8s.render_stages(gpu_profile, "configs/qwen2.5-vl-7b.yaml", gpus={"grpo": 4})
    _, main = _main(manifests["grpo"])
    assert main["resources"]["requests"][GPU] == main["resources"]["limits"][GPU] == "4"
    assert "--num_processes" in main["command"]
    assert main["command"][main["command"].index("--num_processes") + 1] == "4"


def test_tiny_profile_renders_too(repo):
    profile = load_profile(repo / "configs" / "tiny-cpu.yaml")
    for manifest in k8s.render_stages(profile, "configs/tiny-cpu.yaml").values():
        assert k8s.check_manifest(manifest, expect_gpus=0) == []
        assert k8s.validate_strict(manifest) == []


def test_checks_catch_bad_objects(rendered):
    bad = copy.deepcopy(rendered["sft"])
    _, main = _main(bad)
    main["resources"]["requests"][GPU] = "4"
    main["image"] = "ghcr.io/facial-r1/trainer:latest"
    main["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"})
    bad["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    problems = " | ".join(k8s.check_manifest(bad))
    assert "requests 4 != limits 8" in problems
    assert ":latest" in problems
    assert "literal credential" in problems
    assert "root" in problems
    pod = copy.deepcopy(rendered["filter"])
    pod["spec"]["volumes"] = [v for v in pod["spec"]["volumes"] if v["name"] != "dshm"]
    pod["spec"]["containers"][0]["volumeMounts"] = [
        m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] != "dshm"
    ]
    assert any("/dev/shm" in p for p in k8s.check_manifest(pod))


def test_strict_schema_catches_unknown_fields(rendered):
    bad = copy.deepcopy(rendered["filter"])
    bad["spec"]["containers"][0]["gpuCount"] = 1
    assert k8s.validate_strict(bad)


@pytest.mark.parametrize("image", ["trainer", "trainer:latest", "ghcr.io/x/trainer:latest"])
def test_unpinned_images_are_refused(gpu_profile, image):
    profile = copy.deepcopy(gpu_profile)
    profile["resources"]["image"] = image
    with pytest.raises(k8s.K8sConfigError, match="image"):
        k8s.KubeSettings.from_profile(profile)


def test_literal_credentials_are_refused(gpu_profile):
    profile = copy.deepcopy(gpu_profile)
    profile["resources"]["env"]["MLFLOW_TRACKING_PASSWORD"] = "secret"
    with pytest.raises(k8s.K8sConfigError, match="Secret"):
        k8s.KubeSettings.from_profile(profile)


def test_pod_operator_matches_the_render(gpu_profile):
    """The runner executes the same operator the render comes from."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    settings = k8s.KubeSettings.from_profile(gpu_profile)
    spec = StageSpec(
        stage="filter",
        command=("filter",),
        config="configs/qwen2.5-vl-7b.yaml",
        result_path="ignored.json",
        resources=stage_resources(gpu_profile, "filter"),
    )
    op = k8s.build_operator(spec, settings, "configs/qwen2.5-vl-7b.yaml")
    assert isinstance(op, KubernetesPodOperator)
    assert op.do_xcom_push and op.image == settings.image
    assert op.namespace == "facial-r1"


@pytest.mark.parametrize("stage", ["synthesize", "evaluate"])
def test_each_shard_is_its_own_job_with_its_gpu(repo, gpu_profile, stage):
    """shards=N: N jobs (distinct names, the slice in the args, a GPU each on the 7B profile),
    and a CPU merge job."""
    from facial_r1_pipeline import iteration

    ctx = {
        "repo": str(repo),
        "profile": "configs/qwen2.5-vl-7b.yaml",
        "overrides": [],
        "iteration": 1,
        "run_key": "abcd1234",
        "runner": "kubernetes",
        "gpus": {},
        "datasets": [],
        "inputs": iteration.input_files(gpu_profile),
        "parent_run_id": "0" * 32,
        "train_file": "data/seed.jsonl",
        "shards": 3,
    }
    ctx["paths"] = iteration.iteration_paths(ctx)
    up = {"task_grpo": {"outputs": {"model": "runs/iterations/iter-001-abcd1234/grpo/model"}}}
    settings = k8s.KubeSettings.from_profile(gpu_profile)
    manifests = [
        k8s.render(iteration.spec_for(ctx, stage, up, shard=i), settings, ctx["profile"])
        for i in range(3)
    ]
    names = [m["metadata"]["name"] for m in manifests]
    assert len(set(names)) == 3 and all(f"{stage}-shard-{i}-of-3" in n for i, n in enumerate(names))
    for i, manifest in enumerate(manifests):
        assert k8s.check_manifest(manifest, expect_gpus=1) == [], i
        assert k8s.validate_strict(manifest) == [], i
        _, main = _main(manifest)
        assert main["resources"]["requests"][GPU] == main["resources"]["limits"][GPU] == "1"
        args = main["args"]
        assert args[0] == stage and f"{stage}.shard={i}" in args and f"{stage}.shards=3" in args
        assert "--merge" not in args
    merge = k8s.render(iteration.spec_for(ctx, stage, up, merge=True), settings, ctx["profile"])
    assert k8s.check_manifest(merge, expect_gpus=0) == []
    _, main = _main(merge)
    assert main["args"][:2] == [stage, "--merge"] and f"{stage}.shards=3" in main["args"]
    assert merge["metadata"]["name"] not in names
