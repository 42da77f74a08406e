"""Stage tasks own what they start: killing the task stops the stage's process group or pod/job.

Airflow calls a task's ``on_kill`` on timeout, clear, mark-failed or worker shutdown. Here the
tasks come from the real DAG file; the local stage is a real process tree; the Kubernetes
operators are the real provider operators, with a recording stand-in for the API client (there
is no cluster): ``on_kill`` must reach ``delete_namespaced_pod`` / ``delete_namespaced_job``.
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from facial_r1_pipeline.runners import StageError, get_runner, ownership
from facial_r1_pipeline.specs import STAGES, StageSpec

RUNNER_TASKS = ("prepare_data", *STAGES, "version_data")


@pytest.fixture(scope="module")
def k8s_dag(repo):
    """The DAG as the cluster's Airflow parses it (FACIAL_R1_DEFAULT_RUNNER=kubernetes)."""
    from airflow.dag_processing.dagbag import DagBag

    old = os.environ.get("FACIAL_R1_DEFAULT_RUNNER")
    os.environ["FACIAL_R1_DEFAULT_RUNNER"] = "kubernetes"
    try:
        bag = DagBag(dag_folder=str(repo / "dags"))
    finally:
        if old is None:
            os.environ.pop("FACIAL_R1_DEFAULT_RUNNER", None)
        else:
            os.environ["FACIAL_R1_DEFAULT_RUNNER"] = old
    assert bag.import_errors == {}
    return bag.dags["facial_r1_iteration"]


def test_dag_renders_with_the_kubernetes_runner(k8s_dag, repo):
    from facial_r1_core.config import load_profile
    from facial_r1_pipeline import iteration, k8s
    from facial_r1_pipeline.runners.airflow_task import StageTaskOperator

    assert k8s_dag.params["runner"] == "kubernetes"
    for task_id in RUNNER_TASKS:
        assert isinstance(k8s_dag.get_task(task_id), StageTaskOperator), task_id
    # the DAG's own wiring, with the runner it selects, gives valid pods and jobs
    profile_file = "configs/qwen2.5-vl-7b.yaml"
    profile = load_profile(repo / profile_file)
    ctx = {
        "repo": str(repo),
        "profile": profile_file,
        "overrides": [],
        "iteration": 3,
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
    upstream = {
        s: {"outputs": {"model": f"runs/x/{s}/model"}} for s in ("sft", "grpo", "task_grpo")
    }
    for stage in STAGES:
        spec = iteration.spec_for(ctx, stage, upstream)
        manifest = k8s.render(spec, runner.settings, profile_file)
        assert k8s.check_manifest(manifest) == [], stage
        assert manifest["kind"] == ("Job" if spec.resources.kind == "job" else "Pod")


@pytest.mark.parametrize("kind", ["pod", "job"])
def test_on_kill_deletes_the_pod_or_job(k8s_dag, repo, kind, fake_cluster):
    from facial_r1_core.config import load_profile
    from kubernetes.client import models as k8s

    profile = load_profile(repo / "configs/qwen2.5-vl-7b.yaml")
    runner = get_runner("kubernetes", profile=profile, profile_file="configs/qwen2.5-vl-7b.yaml")
    stage = "filter" if kind == "pod" else "grpo"
    from facial_r1_pipeline.specs import stage_resources

    spec = StageSpec(
        stage=stage,
        command=(stage,),
        config="configs/qwen2.5-vl-7b.yaml",
        resources=stage_resources(profile, stage),
    )
    assert spec.resources.kind == kind
    started, release = threading.Event(), threading.Event()

    def execute(op):  # the provider's execute, reduced to "created it, now waiting"
        meta = k8s.V1ObjectMeta(name=f"{op.name}-x1", namespace=op.namespace)
        if kind == "job":
            op.job, op.pods = k8s.V1Job(metadata=meta), []
        else:
            op.pod = k8s.V1Pod(metadata=meta)
        started.set()
        release.wait(10)
        raise RuntimeError("the pod was deleted")

    api = fake_cluster(runner, execute)
    errors = []
    thread = threading.Thread(
        target=lambda: errors.append(_catch(lambda: runner.run(spec, context={}))), daemon=True
    )
    thread.start()
    assert started.wait(10)
    assert ownership.active() == [f"{stage} ({kind} facial-r1-{stage})"]

    k8s_dag.get_task(stage).on_kill()  # what Airflow calls on timeout / clear / mark failed

    name = "delete_namespaced_job" if kind == "job" else "delete_namespaced_pod"
    deletes = [kw for call, kw in api.calls if call == name]
    assert deletes == [deletes[0]] and deletes[0]["name"] == f"facial-r1-{stage}-x1"
    assert deletes[0]["namespace"] == "facial-r1"
    if kind == "job":
        assert deletes[0]["propagation_policy"] == "Foreground"  # its pods go with it
    release.set()
    thread.join(10)
    assert isinstance(errors[0], RuntimeError) and ownership.active() == []


def _catch(fn):
    try:
        return fn()
    except BaseException as exc:
        return exc


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_on_kill_kills_the_local_stage_process_group(k8s_dag, project, tmp_path):
    """A real stage process with a child of its own: both are gone after on_kill."""
    pids = tmp_path / "pids"
    stage_bin = tmp_path / "fake-stage"
    stage_bin.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import os, subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
            open({str(pids)!r} + ".tmp", "w").write(f"{{os.getpid()}} {{child.pid}}")
            os.replace({str(pids)!r} + ".tmp", {str(pids)!r})
            print("training...", flush=True)
            time.sleep(300)
            """
        )
    )
    stage_bin.chmod(0o755)
    lines: list[str] = []
    runner = get_runner("local", repo=project, executable=stage_bin, echo=lines.append)
    spec = StageSpec(
        stage="sft",
        command=("sft",),
        config="configs/tiny-cpu.yaml",
        result_path="runs/results/sft.json",
    )
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_catch(lambda: runner.run(spec))))
    thread.start()
    deadline = time.monotonic() + 30
    while not pids.exists():
        assert time.monotonic() < deadline and thread.is_alive(), lines
        time.sleep(0.05)
    leader, child = (int(p) for p in pids.read_text().split())
    assert os.getpgid(leader) == leader != os.getpgid(0)  # its own process group
    assert os.getpgid(child) == leader and _alive(leader) and _alive(child)

    k8s_dag.get_task("sft").on_kill()

    deadline = time.monotonic() + 10
    while (_alive(leader) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(leader) and not _alive(child)
    thread.join(10)
    assert isinstance(outcome[0], StageError) and outcome[0].exit_code == -15
    assert ownership.active() == []
