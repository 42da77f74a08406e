"""Kubernetes objects for stage runs: build the operator, render its pod/job offline, check it.

Everything comes from the profile's ``resources`` section (see configs/README.md)::

    resources:
      image: ghcr.io/facial-r1/trainer:0.1.0      # pinned tag; ':latest' or no tag is refused
      namespace: facial-r1
      workspace_pvc: facial-r1-workspace          # shared volume for data/ and runs/
      secret_env:                                 # credentials only through secretKeyRef
        - {name: MLFLOW_TRACKING_TOKEN, secret: facial-r1-mlflow, key: token}
      default: {gpus: 0, cpu: "2", memory: 8Gi, shm: 1Gi}
      stages:
        sft: {gpus: 8, cpu: "64", memory: 480Gi, shm: 64Gi, kind: job}

:func:`build_operator` makes the KubernetesPodOperator / KubernetesJobOperator the Kubernetes
runner executes; :func:`render` asks that same operator for its request object with
``dry_run=True`` (no cluster, no credentials) and serialises it as the API server would receive it;
:func:`check_manifest` adds the checks ``kubernetes-validate`` cannot do (GPU requests = limits,
resources set, non-root, pinned image, no literal credentials).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from .specs import SpecError, StageSpec, stage_resources

GPU = "nvidia.com/gpu"
XCOM_RESULT = "/airflow/xcom/return.json"
CREDENTIAL_WORDS = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL)", re.I)
DEFAULT_KUBERNETES_VERSION = "1.32"


class K8sConfigError(ValueError):
    """A ``resources`` setting that would produce an unsafe or invalid object."""


@dataclasses.dataclass(frozen=True)
class SecretEnv:
    name: str
    secret: str
    key: str


@dataclasses.dataclass(frozen=True)
class KubeSettings:
    """Cluster-side settings shared by all stages (the top-level keys of ``resources``)."""

    image: str = "ghcr.io/facial-r1/trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    namespace: str = "facial-r1"
    service_account: str = "facial-r1-trainer"
    connection_id: str = "kubernetes_default"
    workspace_pvc: str = "facial-r1-workspace"
    workspace_mount: str = "/workspace"
    config_dir: str = "/opt/facial-r1/configs"
    gpu_node_selector: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    gpu_tolerations: Sequence[Mapping[str, str]] = dataclasses.field(
        default_factory=lambda: [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    )
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    secret_env: Sequence[SecretEnv] = ()
    run_as_user: int = 1000
    startup_timeout_s: int = 900
    job_ttl_s: int = 86400

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any]) -> KubeSettings:
        section = dict(profile.get("resources") or {})
        section.pop("default", None)
        section.pop("stages", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise K8sConfigError(
                f"resources: unknown key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known | {'default', 'stages'}))}"
            )
        if "secret_env" in section:
            items = []
            for i, item in enumerate(section["secret_env"] or []):
                try:
                    items.append(SecretEnv(**item))
                except TypeError:
                    raise K8sConfigError(
                        f"resources.secret_env[{i}]: needs exactly name, secret, key; got {item!r}"
                    ) from None
            section["secret_env"] = tuple(items)
        settings = cls(**section)
        settings.check()
        return settings

    def check(self) -> None:
        problem = image_problem(self.image)
        if problem:
            raise K8sConfigError(f"resources.image: {problem}")
        for key, value in self.env.items():
            if CREDENTIAL_WORDS.search(key):
                raise K8sConfigError(
                    f"resources.env.{key}: credentials must come from a Secret "
                    f"(resources.secret_env), never a literal value ({value!r:.3}...)"
                )


def check_resources(section: Mapping[str, Any]) -> None:
    """Check a profile's whole ``resources`` section: the pod settings, ``default`` and every
    ``stages.<stage>`` entry, as the runners will read them (errors name the key).

    >>> check_resources({"stages": {"sft": {"nodes": 2, "kind": "job"}}})
    >>> check_resources({"stages": {"sft": {"nodes": 0}}})
    Traceback (most recent call last):
    ...
    facial_r1_pipeline.specs.SpecError: resources.stages.sft.nodes: must be >= 1, got 0
    """
    profile = {"resources": dict(section)}
    KubeSettings.from_profile(profile)
    stages = section.get("stages") or {}
    if not isinstance(stages, Mapping):
        raise K8sConfigError(f"resources.stages must map stage names to resources, not {stages!r}")
    for stage in ["default", *stages]:
        where = "resources.default" if stage == "default" else f"resources.stages.{stage}"
        entry = section.get("default") if stage == "default" else stages[stage]
        if entry is not None and not isinstance(entry, Mapping):
            raise SpecError(f"{where} must be a mapping of resources, not {entry!r}")
        try:
            stage_resources(profile, stage)
        except SpecError as exc:  # name the entry that holds the bad value
            text = str(exc).replace("resources.stages.default", "resources.default")
            if not text.startswith(where):
                text = where + text.removeprefix("resources")
            raise SpecError(text) from None


#: The ``resources`` section's schema (``facial_r1_core.config.PROFILE_SCHEMAS``): its keys are
#: the pod settings plus ``default`` and ``stages``; the values are checked by
#: :func:`check_resources` when the profile loads, not only when a stage starts.
ResourcesSection = dataclasses.make_dataclass(
    "ResourcesSection",
    [
        (name, Any, dataclasses.field(default=None))
        for name in [f.name for f in dataclasses.fields(KubeSettings)] + ["default", "stages"]
    ],
    namespace={
        "__post_init__": lambda self: check_resources(
            {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        )
    },
)


def image_problem(image: str) -> str:
    """Why an image reference is not pinned, or '' when it is.

    >>> image_problem("ghcr.io/x/trainer:0.1.0"), image_problem("trainer")
    ('', "image 'trainer' has no tag; pin one")
    >>> image_problem("trainer:latest")
    "image 'trainer:latest' uses ':latest'; pin a version"
    >>> image_problem("localhost:5000/trainer@sha256:" + "a" * 64)
    ''
    """
    if "@sha256:" in image:
        return ""
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag; pin one"
    if last.rsplit(":", 1)[1] == "latest":
        return f"image {image!r} uses ':latest'; pin a version"
    return ""


def _k8s():
    from kubernetes.client import models as k8s

    return k8s


def container_resources(res) -> Any:
    """Requests equal limits (Guaranteed QoS); GPUs only when the stage asks for them."""
    k8s = _k8s()
    amounts = {"cpu": res.cpu, "memory": res.memory}
    if res.ephemeral_storage:
        amounts["ephemeral-storage"] = res.ephemeral_storage
    if res.gpus:
        amounts[GPU] = str(res.gpus)
    return k8s.V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts))


def pod_parts(spec: StageSpec, settings: KubeSettings, profile_file: str) -> dict[str, Any]:
    """The operator keyword arguments shared by pod and job runs of one stage."""
    from airflow.providers.cncf.kubernetes.secret import Secret

    k8s = _k8s()
    res = spec.resources
    config = str(PurePosixPath(settings.config_dir) / PurePosixPath(profile_file).name)
    argv = spec.argv("facial-r1", result_path=XCOM_RESULT, config=config)
    env = {
        "FACIAL_R1_HOME": settings.workspace_mount,
        "HF_HOME": f"{settings.workspace_mount}/.cache/huggingface",
        "PYTHONUNBUFFERED": "1",
        "DO_NOT_TRACK": "1",
        **dict(settings.env),
    }
    volumes = [
        k8s.V1Volume(
            name="workspace",
            persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                claim_name=settings.workspace_pvc
            ),
        ),
        k8s.V1Volume(
            name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=res.shm)
        ),
        k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource()),
    ]
    mounts = [
        k8s.V1VolumeMount(name="workspace", mount_path=settings.workspace_mount),
        k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
    ]
    container_sc = k8s.V1SecurityContext(
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
    )
    pod_sc = k8s.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=settings.run_as_user,
        run_as_group=settings.run_as_user,
        fs_group=settings.run_as_user,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )
    kwargs: dict[str, Any] = {
        "task_id": f"{spec.stage}_k8s",
        "name": f"facial-r1-{spec.stage}",
        "namespace": settings.namespace,
        "image": settings.image,
        "image_pull_policy": settings.image_pull_policy,
        "cmds": list(spec.launcher) if spec.launcher else [argv[0]],
        "arguments": argv[1:],
        "env_vars": [k8s.V1EnvVar(name=k, value=str(v)) for k, v in env.items()],
        "secrets": [Secret("env", s.name, s.secret, s.key) for s in settings.secret_env],
        "container_resources": container_resources(res),
        "volumes": volumes,
        "volume_mounts": mounts,
        "security_context": pod_sc,
        "container_security_context": container_sc,
        "xcom_sidecar_container_security_context": container_sc,
        "service_account_name": settings.service_account,
        "labels": {
            "app.kubernetes.io/name": "facial-r1",
            "app.kubernetes.io/component": spec.stage,
            "facial-r1/stage": spec.stage,
        },
        "do_xcom_push": True,
        "get_logs": True,
        "durable": True,  # a retried task reattaches to its running pod, never a duplicate
        "startup_timeout_seconds": settings.startup_timeout_s,
        "on_finish_action": "delete_succeeded_pod",
        "kubernetes_conn_id": settings.connection_id,
    }
    if res.gpus:
        kwargs["node_selector"] = dict(settings.gpu_node_selector)
        kwargs["tolerations"] = [k8s.V1Toleration(**dict(t)) for t in settings.gpu_tolerations]
    if res.active_deadline_s:
        kwargs["active_deadline_seconds"] = res.active_deadline_s
    return kwargs


def build_operator(
    spec: StageSpec,
    settings: KubeSettings,
    profile_file: str,
    *,
    kubernetes_conn_id: str | bool | None = False,
):
    """A KubernetesPodOperator (``kind: pod``) or KubernetesJobOperator (``kind: job``)."""
    kwargs = pod_parts(spec, settings, profile_file)
    if kubernetes_conn_id is not False:
        kwargs["kubernetes_conn_id"] = kubernetes_conn_id
    if spec.resources.kind == "job":
        from airflow.providers.cncf.kubernetes.operators.job import KubernetesJobOperator

        return KubernetesJobOperator(
            backoff_limit=0,  # Airflow owns retries (with backoff); a pod never retries itself
            ttl_seconds_after_finished=settings.job_ttl_s,
            wait_until_job_complete=True,
            **kwargs,
        )
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    return KubernetesPodOperator(**kwargs)


def serialize(obj: Any) -> dict[str, Any]:
    """A kubernetes client model as the JSON the API server receives (camelCase, no nulls)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


_OFFLINE_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: offline, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: offline, user: {token: offline-render-only}}]
contexts: [{name: offline, context: {cluster: offline, user: offline}}]
current-context: offline
"""


def render(spec: StageSpec, settings: KubeSettings, profile_file: str) -> dict[str, Any]:
    """The exact pod or job the Kubernetes runner would submit, built offline.

    Pods use ``build_pod_request_obj(dry_run=True)``. The job operator has no dry-run switch and
    asks its hook whether it runs in a cluster, which only parses a kubeconfig: we hand it a
    throwaway one pointing nowhere, so nothing is contacted and no credentials are needed.
    """
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".kubeconfig") as handle:
        handle.write(_OFFLINE_KUBECONFIG)
        handle.flush()
        op = build_operator(spec, settings, profile_file, kubernetes_conn_id=None)
        if spec.resources.kind == "job":
            op.config_file = handle.name
            op.in_cluster = False
            obj = op.build_job_request_obj()
            obj.spec.template.metadata.labels.pop("airflow_kpo_in_cluster", None)
        else:
            obj = op.build_pod_request_obj(dry_run=True)
    return serialize(obj)


def _placeholder_spec(
    stage: str, profile_file: str, resources, launcher: tuple[str, ...] = ()
) -> StageSpec:
    """A stage's spec with the placeholder work dir and run id that ``make k8s-render`` shows."""
    return StageSpec(
        stage=stage,
        command=(stage,),
        config=profile_file,
        overrides=(f"run.work_dir=runs/iterations/iter-001/{stage}",),
        parent_run_id="0" * 32,
        resources=resources,
        launcher=launcher,
    )


def render_stages(
    profile: Mapping[str, Any], profile_file: str, gpus: Mapping[str, int] | None = None
) -> dict[str, dict[str, Any]]:
    """Render every training stage of a profile with placeholder paths and run ids."""
    from .specs import STAGES, launcher_for

    settings = KubeSettings.from_profile(profile)
    out = {}
    for stage in STAGES:
        res = stage_resources(profile, stage, (gpus or {}).get(stage))
        launcher = launcher_for(profile, stage, res.gpus, settings.config_dir)
        spec = _placeholder_spec(stage, profile_file, res, launcher)
        out[stage] = render(spec, settings, profile_file)
    return out


def _pod_spec(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    if manifest.get("kind") == "Job":
        return manifest["spec"]["template"]["spec"]
    return manifest["spec"]


def check_manifest(manifest: Mapping[str, Any], *, expect_gpus: int | None = None) -> list[str]:
    """Our own checks; returns a list of problems (empty = fine)."""
    problems: list[str] = []
    kind = manifest.get("kind")
    spec = _pod_spec(manifest)
    containers = list(spec.get("containers") or [])
    if not containers:
        return [f"{kind}: no containers"]
    pod_sc = spec.get("securityContext") or {}
    if not pod_sc.get("runAsNonRoot") or not pod_sc.get("runAsUser"):
        problems.append(f"{kind}: pod securityContext must set runAsNonRoot and a runAsUser")
    if pod_sc.get("runAsUser") == 0:
        problems.append(f"{kind}: runAsUser 0 is root")
    for c in containers:
        name = c.get("name")
        problem = image_problem(c.get("image", ""))
        if problem:
            problems.append(f"container {name}: {problem}")
        res = c.get("resources") or {}
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        if not requests:
            problems.append(f"container {name}: no resource requests")
        if (requests.get(GPU) or limits.get(GPU)) and str(requests.get(GPU)) != str(
            limits.get(GPU)
        ):
            problems.append(
                f"container {name}: {GPU} requests {requests.get(GPU)} != limits {limits.get(GPU)}"
            )
        csc = c.get("securityContext") or {}
        if csc.get("privileged") or csc.get("allowPrivilegeEscalation", True):
            problems.append(f"container {name}: must set allowPrivilegeEscalation false")
        if csc.get("runAsUser") == 0:
            problems.append(f"container {name}: runs as root")
        for env in c.get("env") or []:
            if "value" in env and CREDENTIAL_WORDS.search(env["name"]):
                problems.append(f"container {name}: env {env['name']} is a literal credential")
    main = containers[0]
    limits = (main.get("resources") or {}).get("limits") or {}
    if not limits.get("memory") or not limits.get("cpu"):
        problems.append(f"container {main.get('name')}: cpu and memory limits must be set")
    gpus = int(limits.get(GPU, 0) or 0)
    if expect_gpus is not None and gpus != expect_gpus:
        problems.append(f"container {main.get('name')}: {gpus} GPUs, expected {expect_gpus}")
    if gpus:
        if not spec.get("nodeSelector"):
            problems.append(f"{kind}: GPU stage without a nodeSelector for GPU nodes")
        if not any(t.get("key") == GPU for t in spec.get("tolerations") or []):
            problems.append(f"{kind}: GPU stage without a toleration for {GPU}")
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    shm = [m for m in main.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"]
    if not shm or (volumes.get(shm[0]["name"], {}).get("emptyDir") or {}).get("medium") != "Memory":
        problems.append(f"{kind}: /dev/shm must be an emptyDir with medium Memory")
    if not any("persistentVolumeClaim" in v for v in volumes.values()):
        problems.append(f"{kind}: no shared volume (persistentVolumeClaim) for data and runs")
    args = main.get("args") or []
    if XCOM_RESULT not in args:
        problems.append(f"{kind}: the stage must write its result to {XCOM_RESULT}")
    if spec.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{kind}: restartPolicy must be Never or OnFailure")
    if kind == "Job" and manifest["spec"].get("backoffLimit") not in (0, None):
        problems.append("Job: backoffLimit must be 0 (Airflow owns retries)")
    return problems


def validate_strict(
    manifest: Mapping[str, Any], version: str = DEFAULT_KUBERNETES_VERSION
) -> list[str]:
    """``kubernetes-validate --strict`` against the official schemas; problems as text."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(dict(manifest), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        return [f"{manifest.get('kind')} {path}: {exc.message}"]
    return []


# --------------------------------------------------------------------------------------------
# Past one node: an Indexed Job + headless Service for multi-node SFT/GRPO, and GRPO's vLLM
# server (TRL's vllm_mode=server) on its own pod and GPUs. A stage with nodes = 1 and no vLLM
# server renders exactly what :func:`render` renders (see :func:`render_run`).

#: Label on every pod of one stage run that talks to its peers (the trainer job's pods and its
#: vLLM server); its value names the run's Services and NetworkPolicy.
GROUP_LABEL = "facial-r1/group"
#: ``trainer`` (the Job's pods) or ``rollout`` (the vLLM server's pods).
ROLE_LABEL = "facial-r1/role"
#: Set by the Job controller on every pod of a Job (Kubernetes >= 1.27) / on Indexed Job pods.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
NODE_RANK_ENV = "FACIAL_R1_NODE_RANK"
JOB_NAME_ENV = "FACIAL_R1_JOB_NAME"
VLLM_HEALTH_PATH = "/health"


def vllm_server_mode(profile: Mapping[str, Any], stage: str) -> bool:
    """True when the stage is GRPO with ``use_vllm`` and ``vllm_mode: server``."""
    section = (profile or {}).get(stage) or {}
    return (
        stage == "grpo"
        and bool(section.get("use_vllm"))
        and str(section.get("vllm_mode", "colocate")) == "server"
    )


def needs_companions(spec: StageSpec, profile: Mapping[str, Any]) -> bool:
    """Whether the stage run needs more than its pod/job (multi-node or a vLLM server)."""
    return spec.resources.nodes > 1 or vllm_server_mode(profile, spec.command[0])


def group_name(spec: StageSpec) -> str:
    """A DNS-1035 name unique to one stage run (stage + a hash of its command and parent run):
    the headless Service, the vLLM Service/Deployment and the NetworkPolicy derive from it.

    >>> group_name(StageSpec(stage="sft", command=("sft",), config="c.yaml"))[:14]
    'facial-r1-sft-'
    """
    import hashlib

    blob = "\0".join([spec.stage, *spec.command, *spec.overrides, spec.parent_run_id or ""])
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    return f"facial-r1-{spec.stage.replace('_', '-')}-{digest}"


def _override(spec: StageSpec, key: str) -> str | None:
    for item in reversed(spec.overrides):
        name, _, value = item.partition("=")
        if name.strip() == key:
            return value
    return None


def _in_workspace(path: str, settings: KubeSettings) -> str:
    if path.startswith(("/", "models:/", "runs:/")) or path.count("/") == 1:
        return path  # absolute, a registry URI or a hub id (owner/name)
    return str(PurePosixPath(settings.workspace_mount) / path)


def vllm_server_address(spec: StageSpec, settings: KubeSettings) -> tuple[str, str]:
    """(Service name, the DNS name the trainer uses) of the run's vLLM server."""
    name = f"{group_name(spec)}-vllm"
    return name, f"{name}.{settings.namespace}.svc"


def with_vllm_server(spec: StageSpec, settings: KubeSettings, profile: Mapping[str, Any]):
    """The GRPO spec pointed at its vLLM server's Service (server mode), else ``spec``."""
    if not vllm_server_mode(profile, spec.command[0]):
        return spec
    _, host = vllm_server_address(spec, settings)
    port = int(((profile.get("grpo") or {}).get("vllm_server_port")) or 8000)
    extra = (f"grpo.vllm_server_host={host}", f"grpo.vllm_server_port={port}")
    return dataclasses.replace(spec, overrides=(*spec.overrides, *extra))


def _group_labels(spec: StageSpec, role: str) -> dict[str, str]:
    return {GROUP_LABEL: group_name(spec), ROLE_LABEL: role}


def build_run_operator(
    spec: StageSpec,
    settings: KubeSettings,
    profile_file: str,
    profile: Mapping[str, Any],
    *,
    kubernetes_conn_id: str | bool | None = False,
):
    """The operator of a stage run: :func:`build_operator` when nothing more is needed, else
    the trainer Job (an Indexed Job of ``nodes`` pods, torchrun/accelerate per pod, when
    ``nodes`` > 1) labelled for its peers, with GRPO pointed at its vLLM server."""
    if not needs_companions(spec, profile):
        return build_operator(spec, settings, profile_file, kubernetes_conn_id=kubernetes_conn_id)
    from .launch import accelerate_config, launch_argv

    labels = _group_labels(spec, "trainer")
    group = group_name(spec)  # of the spec as given (the runner names its companions so)
    spec = with_vllm_server(spec, settings, profile)
    res = spec.resources
    kwargs = pod_parts(spec, settings, profile_file)
    if kubernetes_conn_id is not False:
        kwargs["kubernetes_conn_id"] = kubernetes_conn_id
    kwargs["labels"] = {**kwargs["labels"], **labels}
    job_kwargs: dict[str, Any] = {}
    if res.nodes > 1:
        if res.kind != "job":
            raise K8sConfigError(
                f"resources.stages.{spec.stage}: nodes {res.nodes} needs kind: job "
                "(an Indexed Job, one pod per node)"
            )
        k8s = _k8s()
        master = f"$({JOB_NAME_ENV})-0.{group}.{settings.namespace}.svc"
        config = accelerate_config(profile, spec.command[0])
        if config and config.startswith("configs/"):
            config = f"{settings.config_dir.rstrip('/')}/{config[len('configs/') :]}"
        kwargs["cmds"] = launch_argv(
            res,
            node_rank=f"$({NODE_RANK_ENV})",
            master_addr=master,
            master_port=res.rdzv_port,
            accelerate_config=config,
        )
        kwargs["env_vars"] = [
            *kwargs["env_vars"],
            k8s.V1EnvVar(
                name=NODE_RANK_ENV,
                value_from=k8s.V1EnvVarSource(
                    field_ref=k8s.V1ObjectFieldSelector(
                        field_path=f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
                    )
                ),
            ),
            k8s.V1EnvVar(
                name=JOB_NAME_ENV,
                value_from=k8s.V1EnvVarSource(
                    field_ref=k8s.V1ObjectFieldSelector(
                        field_path=f"metadata.labels['{JOB_NAME_LABEL}']"
                    )
                ),
            ),
        ]
        kwargs["subdomain"] = group
        kwargs["ports"] = [
            k8s.V1ContainerPort(name="rendezvous", container_port=res.rdzv_port, protocol="TCP")
        ]
        job_kwargs = {"completion_mode": "Indexed", "completions": res.nodes}
    from airflow.providers.cncf.kubernetes.operators.job import KubernetesJobOperator

    return KubernetesJobOperator(
        backoff_limit=0,
        ttl_seconds_after_finished=settings.job_ttl_s,
        wait_until_job_complete=True,
        parallelism=res.nodes,
        **job_kwargs,
        **kwargs,
    )


def rendezvous_service(spec: StageSpec, settings: KubeSettings) -> dict[str, Any]:
    """The headless Service whose name is the trainer pods' ``subdomain``: pod ``i`` of the
    Indexed Job resolves as ``<job>-<i>.<service>.<namespace>.svc``."""
    group = group_name(spec)
    port = spec.resources.rdzv_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": group,
            "namespace": settings.namespace,
            "labels": {"app.kubernetes.io/name": "facial-r1", GROUP_LABEL: group},
        },
        "spec": {
            "clusterIP": "None",
            # DNS records exist before the pods are ready: node 0 is the rendezvous itself
            "publishNotReadyAddresses": True,
            "selector": _group_labels(spec, "trainer"),
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def peers_network_policy(spec: StageSpec, settings: KubeSettings) -> dict[str, Any]:
    """Lets the run's own pods (trainer pods, vLLM server) reach each other and nothing else.

    All TCP ports: the rendezvous is one port, but NCCL and gloo open further connections on
    ports the OS picks, and the vLLM weight sync uses NCCL too. The namespace's default deny
    stays in force for every other pod.
    """
    group = group_name(spec)

    def peers() -> dict[str, Any]:
        return {"podSelector": {"matchLabels": {GROUP_LABEL: group}}}

    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": f"{group}-peers",
            "namespace": settings.namespace,
            "labels": {"app.kubernetes.io/name": "facial-r1", GROUP_LABEL: group},
        },
        "spec": {
            "podSelector": {"matchLabels": {GROUP_LABEL: group}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [peers()]}],
            "egress": [{"to": [peers()]}],
        },
    }


def vllm_server_objects(
    spec: StageSpec, settings: KubeSettings, profile: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """GRPO's rollout server (``trl vllm-serve``) as a Deployment + ClusterIP Service.

    GPUs from ``resources.stages.vllm_server`` (requests = limits); tensor parallel size from
    ``grpo.vllm_tensor_parallel_size``, data parallel = GPUs / that; the model is GRPO's start
    model on the workspace volume (TRL sends the trained weights to it every step). Ready when
    its ``/health`` answers 200, which is also what the trainer waits for.
    """
    from .specs import stage_resources

    grpo = profile.get("grpo") or {}
    res = stage_resources(profile, "vllm_server")
    if res.gpus < 1:
        raise K8sConfigError("resources.stages.vllm_server.gpus: the vLLM server needs >= 1 GPU")
    tp = int(grpo.get("vllm_tensor_parallel_size") or 1)
    if res.gpus % tp:
        raise K8sConfigError(
            f"resources.stages.vllm_server.gpus {res.gpus} is not a multiple of "
            f"grpo.vllm_tensor_parallel_size {tp}"
        )
    port = int(grpo.get("vllm_server_port") or 8000)
    model = _override(spec, "grpo.base_model") or grpo.get("base_model")
    if not model:
        sft = profile.get("sft") or {}
        model = sft.get("model_dir") or f"{sft.get('output_dir') or 'runs/sft'}/model"
    model = _in_workspace(str(model), settings)
    name, _ = vllm_server_address(spec, settings)
    labels = {
        "app.kubernetes.io/name": "facial-r1",
        "app.kubernetes.io/component": "vllm-rollout",
        **_group_labels(spec, "rollout"),
    }
    amounts = {"cpu": res.cpu, "memory": res.memory, GPU: str(res.gpus)}
    if res.ephemeral_storage:
        amounts["ephemeral-storage"] = res.ephemeral_storage
    mount = settings.workspace_mount
    args = [
        "vllm-serve",
        "--model",
        model,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--tensor_parallel_size",
        str(tp),
        "--data_parallel_size",
        str(res.gpus // tp),
        "--gpu_memory_utilization",
        str(grpo.get("vllm_gpu_memory_utilization") or 0.9),
        "--dtype",
        str((profile.get("model") or {}).get("dtype") or "auto"),
    ]
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "serviceAccountName": settings.service_account,
            "automountServiceAccountToken": False,
            "nodeSelector": dict(settings.gpu_node_selector),
            "tolerations": [dict(t) for t in settings.gpu_tolerations],
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": settings.run_as_user,
                "runAsGroup": settings.run_as_user,
                "fsGroup": settings.run_as_user,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "vllm",
                    "image": settings.image,
                    "imagePullPolicy": settings.image_pull_policy,
                    "command": ["trl"],
                    "args": args,
                    "env": [
                        {"name": "HOME", "value": "/tmp"},
                        {"name": "HF_HOME", "value": f"{mount}/.cache/huggingface"},
                        {"name": "DO_NOT_TRACK", "value": "1"},
                    ],
                    "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
                    "readinessProbe": {
                        "httpGet": {"path": VLLM_HEALTH_PATH, "port": "http"},
                        "periodSeconds": 10,
                        "failureThreshold": 3,
                    },
                    "startupProbe": {  # loading a 7B model takes minutes
                        "httpGet": {"path": VLLM_HEALTH_PATH, "port": "http"},
                        "periodSeconds": 10,
                        "failureThreshold": 90,
                    },
                    "resources": {"requests": dict(amounts), "limits": dict(amounts)},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "runAsNonRoot": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [
                        {"name": "workspace", "mountPath": mount},
                        {"name": "dshm", "mountPath": "/dev/shm"},
                        {"name": "tmp", "mountPath": "/tmp"},
                    ],
                }
            ],
            "volumes": [
                {
                    "name": "workspace",
                    "persistentVolumeClaim": {"claimName": settings.workspace_pvc},
                },
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm}},
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    }

    def meta() -> dict[str, Any]:
        return {"name": name, "namespace": settings.namespace, "labels": dict(labels)}

    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": _group_labels(spec, "rollout")},
            "template": pod,
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(),
        "spec": {
            "type": "ClusterIP",
            "selector": _group_labels(spec, "rollout"),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [deployment, service]


def companion_objects(
    spec: StageSpec, settings: KubeSettings, profile: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """What a stage run needs beside its pod/job, in creation order (none for one node without
    a vLLM server): the peers' NetworkPolicy, the headless Service, the vLLM server."""
    if not needs_companions(spec, profile):
        return []
    objects = [peers_network_policy(spec, settings)]
    if spec.resources.nodes > 1:
        objects.append(rendezvous_service(spec, settings))
    if vllm_server_mode(profile, spec.command[0]):
        objects.extend(vllm_server_objects(spec, settings, profile))
    return objects


def render_run(
    spec: StageSpec, settings: KubeSettings, profile_file: str, profile: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Everything the Kubernetes runner submits for one stage run, built offline: the trainer
    pod/job first, then :func:`companion_objects`. With nodes = 1 and no vLLM server this is
    exactly ``[render(spec, settings, profile_file)]``."""
    if not needs_companions(spec, profile):
        return [render(spec, settings, profile_file)]
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".kubeconfig") as handle:
        handle.write(_OFFLINE_KUBECONFIG)
        handle.flush()
        op = build_run_operator(spec, settings, profile_file, profile, kubernetes_conn_id=None)
        op.config_file = handle.name
        op.in_cluster = False
        obj = op.build_job_request_obj()
        obj.spec.template.metadata.labels.pop("airflow_kpo_in_cluster", None)
    return [serialize(obj), *companion_objects(spec, settings, profile)]


def render_companions(
    profile: Mapping[str, Any], profile_file: str
) -> dict[str, list[dict[str, Any]]]:
    """For ``make k8s-render``: every training stage of a profile that needs more than its
    pod/job (multi-node, a vLLM server), rendered whole with placeholder paths and run ids."""
    from .specs import STAGES

    settings = KubeSettings.from_profile(profile)
    out = {}
    for stage in STAGES:
        spec = _placeholder_spec(stage, profile_file, stage_resources(profile, stage))
        if needs_companions(spec, profile):
            out[stage] = render_run(spec, settings, profile_file, profile)
    return out
