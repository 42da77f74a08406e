"""The CPU twin of a multi-node training job: 2 nodes x 1 process on 127.0.0.1, gloo.

The local runner starts the stage the way the Kubernetes Indexed Job does (the same
:func:`facial_r1_pipeline.launch.launch_argv`: torchrun per node, static rendezvous at node 0,
node rank 0..N-1) and runs the real ``facial-r1 sft`` / ``facial-r1 grpo`` command on the tiny
model. Both ranks must see a world of 2 and train; only rank 0 writes the result, the stage
state and the MLflow run; the model it saves loads.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from facial_r1_pipeline.launch import launch_argv
from facial_r1_pipeline.runners.local import LocalRunner
from facial_r1_pipeline.specs import Resources, StageSpec
from facial_r1_training import models
from facial_r1_training.testing import write_profile, write_toy_dataset

TWO_NODES = Resources(nodes=2, processes=1, kind="job")


@pytest.fixture(autouse=True)
def _launcher_files_in_tmp_path(tmp_path, monkeypatch):
    """torchrun leaves a torchelastic_* folder under TMPDIR per launch: keep those in tmp_path."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("twin")
    models.build_tiny(root / "tiny")
    write_toy_dataset(root / "data", 16, split="train")
    profile = write_profile(
        root / "profile.yaml",
        {
            "profile": {"name": "twin"},
            "run": {"seed": 0, "torch_threads": 1},
            "mlflow": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "twin",
                "artifact_root": str(root / "art"),
            },
            "model": {"path": "tiny"},
            "sft": {
                "train_file": ["data/Toy_train.jsonl"],
                "output_dir": "runs/sft",
                "max_steps": 3,
                "per_device_train_batch_size": 2,
                "logging_steps": 1,
                "warmup_steps": 0,
                "save_steps": 100,
                "learning_rate": 3e-3,
                "max_length": 512,
            },
            "grpo": {
                "train_file": ["data/Toy_train.jsonl"],
                "output_dir": "runs/grpo",
                "max_steps": 2,
                "num_generations": 2,
                "per_device_train_batch_size": 2,
                "max_completion_length": 8,
                "heldout_size": 2,
                "save_steps": 100,
                "log_model": False,
                "track_weight_change": False,
            },
        },
    )
    return root, profile


def _runner(root: Path, lines: list[str]) -> LocalRunner:
    exe = Path(sys.executable).parent / "facial-r1"
    env = {"FACIAL_R1_HOME": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    return LocalRunner(root, executable=exe, env=env, echo=lines.append)


def _rank_lines(text: str, stage: str) -> set[str]:
    return set(re.findall(rf"{stage}: (rank \d+ of \d+) trained \d+ steps", text))


def _mlflow_runs(root: Path, stage: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    found = mlflow.search_runs(
        experiment_names=["twin"], filter_string=f"tags.stage = '{stage}'", output_format="list"
    )
    return found


def test_local_runner_builds_the_same_launcher_as_kubernetes(home):
    root, profile = home
    spec = StageSpec(stage="sft", command=("sft",), config=str(profile), resources=TWO_NODES)
    runner = _runner(root, [])
    argv = spec.argv(str(runner.executable))
    nodes = runner.node_commands(spec, argv)
    assert len(nodes) == 2
    port = int(nodes[0][nodes[0].index("--master-port") + 1])
    python = str(runner.executable.parent / "python")
    for rank, cmd in enumerate(nodes):
        expected = launch_argv(
            TWO_NODES, node_rank=rank, master_addr="127.0.0.1", master_port=port, python=python
        )
        assert cmd == [*expected, *argv[1:]]
    # one process, or a stage that is not a training stage: the plain command, unchanged
    assert runner.node_commands(StageSpec("sft", ("sft",), str(profile)), argv) == [argv]
    filt = StageSpec("filter", ("filter",), str(profile), resources=TWO_NODES)
    assert runner.node_commands(filt, ["x", "filter"]) == [["x", "filter"]]


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_two_node_twin_trains_and_only_rank0_writes(home, stage):
    root, profile = home
    if stage == "grpo":
        assert (root / "runs/sft/model").is_dir(), "the sft case runs first"
    result_path = root / f"results/{stage}.json"
    lines: list[str] = []
    spec = StageSpec(
        stage=stage,
        command=(stage,),
        config=str(profile),
        result_path=str(result_path),
        resources=TWO_NODES,
    )
    result = _runner(root, lines).run(spec)
    node0 = "\n".join(lines)
    node1 = Path(f"{result_path}.log.node1").read_text(encoding="utf-8")
    # both ranks joined a world of 2 and stepped; node 0's log is rank 0, node 1's is rank 1
    assert _rank_lines(node0, stage) == {"rank 0 of 2"}
    assert _rank_lines(node1, stage) == {"rank 1 of 2"}
    steps = 3 if stage == "sft" else 2
    assert result["metrics"]["global_step"] == steps and result["metrics"]["world_size"] == 2
    # only rank 0 wrote: one result (a valid stage result), one MLflow run, one stage state
    on_disk = json.loads(result_path.read_text(encoding="utf-8"))
    assert on_disk["status"] == "ok" and on_disk["stage"] == stage
    assert on_disk["mlflow_run_id"] == result["mlflow_run_id"]
    runs = _mlflow_runs(root, stage)
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    assert json.loads((root / f"runs/{stage}/stage_state.json").read_text())["status"] == "done"
    assert not list(root.rglob(f"{stage}.json.previous"))
    # the saved model loads
    model, _ = models.load_model_and_processor(on_disk["outputs"]["model"])
    assert sum(p.numel() for p in model.parameters()) > 0
    assert os.environ.get("RANK") is None  # nothing leaked into the test process


DECIDE = """
import sys
from facial_r1_core.resume import StageStateError
from facial_r1_training import distributed

distributed.start(use_cpu=True)
rank, size = distributed.world()
print(f"rank {rank} of {size}: got {distributed.decide(lambda: 'rank 0 decided')}", flush=True)

def refuse():
    raise StageStateError("sft: runs/sft was made with other settings")

try:
    distributed.decide(refuse)
except StageStateError as exc:
    print(f"rank {rank} of {size}: StageStateError: {exc}", flush=True)
    sys.exit(2)
"""


def test_rank0_decides_for_every_rank_and_its_refusal_reaches_them_all(tmp_path):
    """What a resumed multi-process stage relies on: rank 0's decision (or its refusal, e.g. a
    changed fingerprint) reaches every rank, so no worker waits for one that never comes."""
    import subprocess

    from facial_r1_pipeline.launch import free_port

    script = tmp_path / "decide.py"
    script.write_text(DECIDE, encoding="utf-8")
    cmd = launch_argv(
        Resources(processes=2),
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=free_port(),
        python=sys.executable,
    )
    assert cmd[-2:] == ["-m", "facial_r1_core.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd[:-2], str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    out = proc.stdout
    assert proc.returncode != 0  # the workers exited 2, so the launcher fails the stage
    for rank in (0, 1):
        assert f"rank {rank} of 2: got rank 0 decided" in out
        assert f"rank {rank} of 2: StageStateError: sft: runs/sft was made" in out


def test_a_failing_node_stops_the_others(home, tmp_path):
    """A node that dies would leave the others waiting in the rendezvous: all are stopped."""
    import time

    from facial_r1_pipeline.runners.base import StageError

    root, profile = home
    runner = _runner(root, [])
    runner.node_commands = lambda spec, argv: [["sleep", "60"], ["sh", "-c", "sleep 0.5; exit 3"]]
    spec = StageSpec(
        stage="sft",
        command=("sft",),
        config=str(profile),
        result_path=str(tmp_path / "sft.json"),
        resources=TWO_NODES,
    )
    started = time.monotonic()
    with pytest.raises(StageError, match="node 1 exited with code 3"):
        runner.run(spec)
    assert time.monotonic() - started < 15  # node 0 (sleep 60) was stopped, not waited for
