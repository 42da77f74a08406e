"""Training past one node, rendered offline: the multi-node Indexed Job + headless Service, GRPO's
vLLM rollout server, the NetworkPolicy between a run's pods, and the runner's clean-up on kill.

Nothing here reaches a cluster; the checks are on the exact objects the Kubernetes runner
submits (:func:`facial_r1_pipeline.k8s.render_run`, the same builder the runner uses)."""

from __future__ import annotations

import copy
import threading

import pytest
import yaml
from facial_r1_core.config import load_profile
from facial_r1_pipeline import k8s
from facial_r1_pipeline.runners.kubernetes import KubernetesRunner
from facial_r1_pipeline.specs import STAGES, SpecError, StageSpec, stage_resources

GPU = "nvidia.com/gpu"
GPU_PROFILE = "configs/qwen2.5-vl-7b.yaml"
SERVER_PROFILE = "configs/qwen2.5-vl-7b-vllm-server.yaml"


def _spec(profile, stage, **overrides):
    res = stage_resources(profile, stage)
    return StageSpec(
        stage=stage,
        command=(stage,),
        config=GPU_PROFILE,
        overrides=(f"{stage}.output_dir=runs/iterations/iter-001/{stage}",),
        parent_run_id="0" * 32,
        resources=res,
        **overrides,
    )


def _profile(repo, path=GPU_PROFILE, nodes=None, stage="sft", **resources):
    profile = load_profile(repo / path)
    section = profile["resources"]["stages"].setdefault(stage, {})
    if nodes is not None:
        section["nodes"] = nodes
    section.update(resources)
    return profile


def _by_kind(objects, kind):
    found = [o for o in objects if o["kind"] == kind]
    assert found, kind
    return found


def _flag(argv, *names):
    for name in names:
        if name in argv:
            return argv[argv.index(name) + 1]
    raise AssertionError(f"none of {names} in {argv}")


def _matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("path", [GPU_PROFILE, "configs/tiny-cpu.yaml"])
def test_one_node_renders_exactly_what_it_rendered_before(repo, path):
    """nodes = 1 (the default) and no vLLM server: the same single object as `render`."""
    profile = load_profile(repo / path)
    settings = k8s.KubeSettings.from_profile(profile)
    for stage in STAGES:
        spec = _spec(profile, stage)
        assert spec.resources.nodes == 1
        assert not k8s.needs_companions(spec, profile)
        assert k8s.companion_objects(spec, settings, profile) == []
        run = k8s.render_run(spec, settings, path, profile)
        once = k8s.render(spec, settings, path)
        for doc in (*run, once):  # the provider names pods/jobs with a random suffix
            doc["metadata"].pop("name")
            if doc["kind"] == "Job":
                doc["spec"]["template"]["metadata"].pop("name")
        assert run == [once], stage


@pytest.mark.parametrize(
    ("path", "nodes", "launcher"),
    [
        (GPU_PROFILE, 2, "accelerate"),
        (GPU_PROFILE, 4, "torchrun"),
        ("configs/tiny-cpu.yaml", 2, "torchrun"),
    ],
)
def test_multinode_job_service_and_launcher_agree(repo, path, nodes, launcher):
    profile = _profile(repo, path, nodes=nodes, kind="job")
    if launcher == "torchrun" and path == GPU_PROFILE:
        profile["sft"]["accelerate_config"] = None  # plain torchrun, one process per GPU
    if path != GPU_PROFILE:
        profile["resources"]["stages"]["sft"]["processes"] = 2
    settings = k8s.KubeSettings.from_profile(profile)
    spec = _spec(profile, "sft")
    objects = k8s.render_run(spec, settings, path, profile)
    for doc in objects:
        assert k8s.validate_strict(doc) == [], doc["kind"]
        assert yaml.safe_load(yaml.safe_dump(doc)) == doc
    (job,) = _by_kind(objects, "Job")
    (svc,) = _by_kind(objects, "Service")
    (policy,) = _by_kind(objects, "NetworkPolicy")
    gpus = spec.resources.gpus
    assert k8s.check_manifest(job, expect_gpus=gpus) == []

    # an Indexed Job of one pod per node, all running at once, never retried by itself
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]
    main = pod["spec"]["containers"][0]
    labels = pod["metadata"]["labels"]

    # the headless Service is the pods' subdomain and selects exactly this run's trainer pods
    assert svc["spec"]["clusterIP"] == "None"
    assert pod["spec"]["subdomain"] == svc["metadata"]["name"] == k8s.group_name(spec)
    assert svc["metadata"]["namespace"] == job["metadata"]["namespace"] == settings.namespace
    selector = svc["spec"]["selector"]
    assert _matches(selector, labels)
    assert selector[k8s.GROUP_LABEL] == k8s.group_name(spec)  # unique to this run
    other = _spec(profile, "sft", run_name="another run")
    other = StageSpec(**{**other.__dict__, "parent_run_id": "1" * 32})
    assert not _matches(selector, {**labels, k8s.GROUP_LABEL: k8s.group_name(other)})
    assert svc["spec"]["publishNotReadyAddresses"] is True

    # the launcher: nodes, processes per node = GPU limit, node rank from the completion index,
    # master = pod 0's DNS name under the Service, port = the Service's and the container's
    cmd = main["command"]
    limit = int(main["resources"]["limits"].get(GPU, 0))
    assert main["resources"]["requests"].get(GPU) == main["resources"]["limits"].get(GPU)
    per_node = limit or 2
    if launcher == "accelerate":
        assert cmd[:2] == ["accelerate", "launch"]
        assert int(_flag(cmd, "--num_machines")) == nodes
        assert int(_flag(cmd, "--num_processes")) == nodes * per_node
        rank, addr, port = (
            _flag(cmd, "--machine_rank"),
            _flag(cmd, "--main_process_ip"),
            _flag(cmd, "--main_process_port"),
        )
    else:
        assert cmd[1:3] == ["-m", "torch.distributed.run"]
        assert int(_flag(cmd, "--nnodes")) == nodes
        assert int(_flag(cmd, "--nproc-per-node")) == per_node
        rank, addr, port = (
            _flag(cmd, "--node-rank"),
            _flag(cmd, "--master-addr"),
            _flag(cmd, "--master-port"),
        )
    assert cmd[-2:] == ["-m", "facial_r1_core.cli"] and main["args"][0] == "sft"
    env = {e["name"]: e for e in main["env"]}
    assert rank == f"$({k8s.NODE_RANK_ENV})"
    assert env[k8s.NODE_RANK_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    host, _, domain = addr.partition(".")
    assert host == f"$({k8s.JOB_NAME_ENV})-0"  # Indexed Job pod hostname: <job name>-<index>
    assert env[k8s.JOB_NAME_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/job-name']"
    )
    assert domain == f"{svc['metadata']['name']}.{settings.namespace}.svc"
    (svc_port,) = svc["spec"]["ports"]
    (container_port,) = main["ports"]
    assert int(port) == svc_port["port"] == svc_port["targetPort"]
    assert container_port["containerPort"] == int(port) == spec.resources.rdzv_port

    # only the run's own pods may reach each other (the namespace default-denies the rest)
    peers = {"podSelector": {"matchLabels": {k8s.GROUP_LABEL: k8s.group_name(spec)}}}
    assert policy["spec"]["podSelector"] == peers["podSelector"]
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert policy["spec"]["ingress"] == [{"from": [peers]}]
    assert policy["spec"]["egress"] == [{"to": [peers]}]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    base = list(yaml.safe_load_all((repo / "infra/base/networkpolicies.yaml").read_text()))
    deny = next(d for d in base if d["metadata"]["name"] == "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}

    # still non-root, sized, pinned (check_manifest above), and the result comes back by XCom
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_multinode_settings_are_checked(repo):
    profile = _profile(repo, nodes=2, kind="pod")
    settings = k8s.KubeSettings.from_profile(profile)
    with pytest.raises(k8s.K8sConfigError, match="kind: job"):
        k8s.render_run(_spec(profile, "sft"), settings, GPU_PROFILE, profile)
    for key, value, message in [
        ("nodes", 0, "must be >= 1"),
        ("nodes", 65, "must be <= 64"),
        ("rdzv_port", 80, "must be >= 1024"),
        ("processes", 4, "one process per GPU"),
        ("nodes", "two", "expected an integer"),
    ]:
        bad = copy.deepcopy(profile)
        bad["resources"]["stages"]["sft"][key] = value
        with pytest.raises(SpecError, match=message):
            stage_resources(bad, "sft")


def test_grpo_vllm_server_objects_are_consistent(repo):
    profile = load_profile(repo / SERVER_PROFILE)
    settings = k8s.KubeSettings.from_profile(profile)
    spec = _spec(profile, "grpo")
    spec = StageSpec(
        **{**spec.__dict__, "overrides": (*spec.overrides, "grpo.base_model=runs/it1/sft/model")}
    )
    objects = k8s.render_run(spec, settings, SERVER_PROFILE, profile)
    for doc in objects:
        assert k8s.validate_strict(doc) == [], doc["kind"]
    (job,) = _by_kind(objects, "Job")
    assert k8s.check_manifest(job, expect_gpus=6) == []
    (deployment,) = _by_kind(objects, "Deployment")
    (policy,) = _by_kind(objects, "NetworkPolicy")
    services = {s["metadata"]["name"]: s for s in _by_kind(objects, "Service")}
    name, host = k8s.vllm_server_address(spec, settings)
    server_svc = services[name]
    assert len(services) == 1  # one node: no headless Service

    trainer = job["spec"]["template"]
    trainer_main = trainer["spec"]["containers"][0]
    server_pod = deployment["spec"]["template"]
    server = server_pod["spec"]["containers"][0]
    # GPUs: trainer + server = what the profile asks (one 8-GPU node), requests = limits
    trainer_gpus = int(trainer_main["resources"]["limits"][GPU])
    server_gpus = int(server["resources"]["limits"][GPU])
    assert server["resources"]["requests"][GPU] == server["resources"]["limits"][GPU]
    assert trainer_gpus == stage_resources(profile, "grpo").gpus == 6
    assert server_gpus == stage_resources(profile, "vllm_server").gpus == 2
    assert trainer_gpus + server_gpus == 8
    quota = next(
        d
        for d in yaml.safe_load_all((repo / "infra/components/gpu-jobs/gpu-jobs.yaml").read_text())
        if d["kind"] == "ResourceQuota"
    )
    assert trainer_gpus + server_gpus <= int(quota["spec"]["hard"]["requests.nvidia.com/gpu"])
    tp = int(_flag(server["args"], "--tensor_parallel_size"))
    dp = int(_flag(server["args"], "--data_parallel_size"))
    assert tp * dp == server_gpus
    assert server["command"] == ["trl"] and server["args"][0] == "vllm-serve"
    assert _flag(server["args"], "--model") == "/workspace/runs/it1/sft/model"  # GRPO's start
    # names, selectors, ports
    assert _matches(deployment["spec"]["selector"]["matchLabels"], server_pod["metadata"]["labels"])
    assert server_svc["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert not _matches(server_svc["spec"]["selector"], trainer["metadata"]["labels"])
    (svc_port,) = server_svc["spec"]["ports"]
    (container_port,) = server["ports"]
    port = profile["grpo"]["vllm_server_port"]
    assert svc_port["port"] == container_port["containerPort"] == port
    assert svc_port["targetPort"] == container_port["name"]
    assert int(_flag(server["args"], "--port")) == port
    for probe in ("readinessProbe", "startupProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": container_port["name"]}
    # the trainer points at the Service's DNS name in the namespace
    args = trainer_main["args"]
    assert f"grpo.vllm_server_host={host}" in args
    assert host == f"{name}.{settings.namespace}.svc"
    assert f"grpo.vllm_server_port={port}" in args
    # trainer and server reach each other (HTTP, NCCL weight sync), nobody else does
    for labels in (trainer["metadata"]["labels"], server_pod["metadata"]["labels"]):
        assert _matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    # non-root, no API token, GPU nodes
    assert server_pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert server_pod["spec"]["automountServiceAccountToken"] is False
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert server_pod["spec"]["nodeSelector"] == dict(settings.gpu_node_selector)


def test_server_mode_needs_gpus_for_the_server(repo):
    profile = load_profile(repo / SERVER_PROFILE)
    profile["resources"]["stages"]["vllm_server"]["gpus"] = 0
    settings = k8s.KubeSettings.from_profile(profile)
    with pytest.raises(k8s.K8sConfigError, match="needs >= 1 GPU"):
        k8s.render_run(_spec(profile, "grpo"), settings, SERVER_PROFILE, profile)


class _Companions:
    def __init__(self):
        self.created: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str]] = []

    def create(self, obj):
        self.created.append((obj["kind"], obj["metadata"]["name"]))

    def delete(self, obj):
        self.deleted.append((obj["kind"], obj["metadata"]["name"]))


def _runner_with_fakes(fake_cluster, profile, execute_result, started=None, release=None):
    from kubernetes.client import models as m

    runner = KubernetesRunner(profile, GPU_PROFILE)
    companions = _Companions()

    def execute(op):
        meta = m.V1ObjectMeta(name=f"{op.name}-x1", namespace=op.namespace)
        op.job, op.pods = m.V1Job(metadata=meta), []
        if started is not None:
            started.set()
            release.wait(10)
            raise RuntimeError("the job was deleted")
        return execute_result

    api = fake_cluster(runner, execute)
    runner.companion_client = lambda op: companions
    return runner, api, companions


def test_on_kill_deletes_the_job_and_its_service(repo, fake_cluster):
    from facial_r1_pipeline.runners import ownership

    profile = _profile(repo, nodes=2)
    spec = _spec(profile, "sft")
    started, release = threading.Event(), threading.Event()
    runner, api, companions = _runner_with_fakes(fake_cluster, profile, None, started, release)
    errors = []

    def run():
        try:
            runner.run(spec, context={})
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    group = k8s.group_name(spec)
    assert companions.created == [("NetworkPolicy", f"{group}-peers"), ("Service", group)]
    assert ownership.stop_all() == [
        f"sft (job {k8s.build_run_operator(spec, runner.settings, GPU_PROFILE, profile).name})"
    ]
    deletes = [kw for call, kw in api.calls if call == "delete_namespaced_job"]
    assert len(deletes) == 1 and deletes[0]["propagation_policy"] == "Foreground"
    assert deletes[0]["name"] == "facial-r1-sft-x1" and deletes[0]["namespace"] == "facial-r1"
    assert companions.deleted == [("Service", group), ("NetworkPolicy", f"{group}-peers")]
    release.set()
    thread.join(10)
    assert isinstance(errors[0], RuntimeError)
    # deleted once, not again when the stage's own clean-up runs after the kill
    assert len(companions.deleted) == 2 and ownership.active() == []


def test_rank0_result_is_taken_and_companions_go_after_success(repo, fake_cluster):
    profile = _profile(repo, nodes=2)
    spec = _spec(profile, "sft")
    ok = {"stage": "sft", "status": "ok", "outputs": {}, "metrics": {"world_size": 16}}
    runner, _, companions = _runner_with_fakes(fake_cluster, profile, [ok, None])
    assert runner.run(spec, context={})["metrics"] == {"world_size": 16}
    assert sorted(companions.deleted) == sorted(companions.created) and companions.created
    runner, _, _ = _runner_with_fakes(fake_cluster, profile, [None, None])
    with pytest.raises(Exception, match="expected one pod result"):
        runner.run(spec, context={})


def test_rbac_lets_the_scheduler_manage_the_companions(repo):
    docs = list(yaml.safe_load_all((repo / "infra/base/rbac.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "Role")
    verbs = {
        (group, r, v)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    for group, resource in [
        ("", "services"),
        ("apps", "deployments"),
        ("networking.k8s.io", "networkpolicies"),
    ]:
        assert (group, resource, "create") in verbs and (group, resource, "delete") in verbs


def test_the_dag_wiring_carries_nodes_and_the_server_mode(repo):
    """`--conf '{"overrides": ["resources.stages.sft.nodes=2"]}'` with the server profile: the
    iteration's own specs become an Indexed Job and a GRPO job pointed at its vLLM server."""
    from facial_r1_pipeline import iteration

    overrides = ["resources.stages.sft.nodes=2"]
    profile = load_profile(repo / SERVER_PROFILE, overrides)
    ctx = {
        "repo": str(repo),
        "profile": SERVER_PROFILE,
        "overrides": overrides,
        "iteration": 2,
        "run_key": "abcd1234",
        "runner": "kubernetes",
        "gpus": {},
        "datasets": [],
        "parent_run_id": "0" * 32,
        "inputs": iteration.input_files(profile),
        "train_file": iteration.input_files(profile)["seed_file"],
    }
    ctx["paths"] = iteration.iteration_paths(ctx)
    runner = iteration.make_runner(ctx)
    upstream = {s: {"outputs": {"model": f"runs/x/{s}/model"}} for s in ("sft", "grpo")}
    sft = iteration.spec_for(ctx, "sft", upstream)
    assert sft.resources.nodes == 2
    (job, *companions) = k8s.render_run(sft, runner.settings, SERVER_PROFILE, runner.profile)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert {c["kind"] for c in companions} == {"Service", "NetworkPolicy"}
    grpo = iteration.spec_for(ctx, "grpo", upstream)
    objects = k8s.render_run(grpo, runner.settings, SERVER_PROFILE, runner.profile)
    (deployment,) = _by_kind(objects, "Deployment")
    server = deployment["spec"]["template"]["spec"]["containers"][0]
    assert _flag(server["args"], "--model") == "/workspace/runs/x/sft/model"  # the SFT model
    (trainer,) = _by_kind(objects, "Job")
    args = trainer["spec"]["template"]["spec"]["containers"][0]["args"]
    _, host = k8s.vllm_server_address(grpo, runner.settings)
    assert f"grpo.vllm_server_host={host}" in args


def test_companion_client_uses_the_typed_apis(repo, monkeypatch):
    """Create and delete go to the kubernetes client's typed APIs (methods that exist), in the
    run's namespace; an object left by an earlier attempt (409) is reused, a gone one (404) is
    fine to delete, anything else is an error."""
    from facial_r1_pipeline.runners.kubernetes import CompanionClient
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    real = {n: getattr(client, n) for n in ("CoreV1Api", "AppsV1Api", "NetworkingV1Api")}
    calls, status = [], {}

    def fake(cls_name):
        class Fake:
            def __init__(self, api_client):
                assert api_client == "api-client"

            def __getattr__(self, method):
                assert hasattr(real[cls_name], method), (cls_name, method)

                def call(**kwargs):
                    calls.append((cls_name, method, kwargs))
                    if method in status:
                        raise ApiException(status=status[method])

                return call

        return Fake

    for name in real:
        monkeypatch.setattr(client, name, fake(name))
    profile = load_profile(repo / SERVER_PROFILE, ["resources.stages.grpo.nodes=2"])
    settings = k8s.KubeSettings.from_profile(profile)
    objects = k8s.companion_objects(_spec(profile, "grpo"), settings, profile)
    companions = CompanionClient("api-client")
    for obj in objects:
        companions.create(obj)
        companions.delete(obj)
    methods = {(c, m) for c, m, _ in calls}
    assert methods == {
        ("NetworkingV1Api", "create_namespaced_network_policy"),
        ("NetworkingV1Api", "delete_namespaced_network_policy"),
        ("CoreV1Api", "create_namespaced_service"),
        ("CoreV1Api", "delete_namespaced_service"),
        ("AppsV1Api", "create_namespaced_deployment"),
        ("AppsV1Api", "delete_namespaced_deployment"),
    }
    assert {kw["namespace"] for _, _, kw in calls} == {"facial-r1"}
    status.update(create_namespaced_service=409, delete_namespaced_service=404)
    service = next(o for o in objects if o["kind"] == "Service")
    companions.create(service)
    companions.delete(service)
    status.update(create_namespaced_service=500)
    with pytest.raises(ApiException):
        companions.create(service)
