"""GRPO stage: core rewards wired into TRL, per-step logging, resume, clear failures."""

from __future__ import annotations

import hashlib
import json
import shutil

import mlflow
import pytest
from facial_r1_core.cli import main as cli_main
from facial_r1_core.config import from_section
from facial_r1_training import models
from facial_r1_training.configs import GRPOStageConfig
from facial_r1_training.grpo import reward_funcs
from facial_r1_training.testing import toy_completion, write_profile, write_toy_dataset

FAST = [
    "--set",
    "grpo.per_device_train_batch_size=4",
    "--set",
    "grpo.num_generations=2",
    "--set",
    "grpo.max_completion_length=24",
    "--set",
    "grpo.logging_steps=1",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    models.build_tiny(root / "tiny")
    path = write_toy_dataset(root / "data", 8, split="train")
    # one record without any annotation: GRPO has nothing to reward it with
    lines = path.read_text().splitlines()
    bare = json.loads(lines[0])
    bare.update(AUs=[], labels=[], image=bare["image"])
    lines[0] = json.dumps(bare)
    path.write_text("\n".join(lines) + "\n")
    profile = write_profile(
        root / "profile.yaml",
        {
            "profile": {"name": "test-grpo"},
            "run": {"seed": 0, "torch_threads": 1},
            "mlflow": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "grpo-tests",
                "artifact_root": str(root / "art"),
            },
            "model": {"path": "tiny"},
            "sft": {"output_dir": "runs/sft"},
            "grpo": {
                "train_file": ["data/Toy_train.jsonl"],
                "output_dir": "runs/grpo",
                "max_steps": 2,
                "save_steps": 1,
                "learning_rate": 1e-3,
            },
        },
    )
    return root, profile


@pytest.fixture
def env(home, monkeypatch):
    root, _ = home
    monkeypatch.setenv("FACIAL_R1_HOME", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


def test_reward_functions_named_and_weighted():
    funcs = reward_funcs("paper")
    assert [f.__name__ for f in funcs] == ["au", "accuracy", "format"]
    good = [[{"role": "assistant", "content": toy_completion(["AU6", "AU12"], "happiness")}]]
    bad = [[{"role": "assistant", "content": "<answer>anger or fear</answer>"}]]
    cols = {"AUs": [["AU6", "AU12"]], "labels": [["happiness"]]}
    assert [f(good, **cols)[0] for f in funcs] == [1.0, 1.0, 1.0]
    assert [f(bad, **cols)[0] for f in funcs] == [0.0, 0.0, 0.0]
    ref = reward_funcs("reference")
    assert ref[0](bad, **cols) == [-1.0]
    cfg = from_section(GRPOStageConfig, {"reward_weights": {"format": 0.5}}, name="grpo")
    assert cfg.weights() == [1.0, 1.0, 0.5]


def test_grpo_runs_logs_and_refuses_other_settings(home, env, tmp_path, capsys):
    root, profile = home
    first = tmp_path / "g1.json"
    code = cli_main(
        [
            "grpo",
            "--config",
            str(profile),
            *FAST,
            "--model",
            "tiny",
            "--set",
            "grpo.reward_weights={au: 2.0}",
            "--result",
            str(first),
        ]
    )
    assert code == 0
    data = json.loads(first.read_text())
    m = data["metrics"]
    assert m["global_step"] == 2 and m["resumed_from_step"] == 0
    assert m["data_rejected_no_labels"] == 1 and m["data_kept"] == 7
    for key in (
        "mean_reward_au",
        "mean_reward_accuracy",
        "mean_reward_format",
        "mean_kl",
        "mean_completion_length",
        "mean_zero_variance_groups",
        "s_per_step",
    ):
        assert key in m, key
    assert 0.0 <= m["mean_zero_variance_groups"] <= 1.0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    run = client.get_run(data["mlflow_run_id"])
    for key in ("rewards/au/mean", "kl", "completions/mean_length", "zero_variance_groups"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [h.step for h in history] == [1, 2], key
    assert run.data.params["reward_weights.au"] == "2.0"
    # diagnostics: one of the 7 usable records is held out (at most a quarter), weights moved
    assert m["heldout_samples"] == 1 and m["samples"] == 6
    for tag in ("before", "after"):
        parts = [m[f"heldout_{c}_{tag}"] for c in ("au", "accuracy", "format")]
        assert all(0.0 <= p <= 1.0 for p in parts)
        assert m[f"heldout_reward_{tag}"] == pytest.approx(2.0 * parts[0] + parts[1] + parts[2])
    assert m["heldout_reward_delta"] == pytest.approx(
        m["heldout_reward_after"] - m["heldout_reward_before"]
    )
    assert m["relative_weight_change"] >= 0.0  # the untrained model earns 0 everywhere: no signal
    assert m["grpo_noop"] == float(m["mean_kl"] < 1e-3)
    assert run.data.tags["grpo_noop"] == ("true" if m["grpo_noop"] else "false")
    assert run.data.metrics["relative_weight_change"] == pytest.approx(m["relative_weight_change"])
    saved = json.loads((root / "runs/grpo/model/facial_r1_training.json").read_text())
    assert saved["reward_weights"] == {"au": 2.0, "accuracy": 1.0, "format": 1.0}
    # the final model is logged to the artifact store as an MLflow model of this run
    logged = client.get_logged_model(data["outputs"]["logged_model_id"])
    assert data["outputs"]["logged_model"] == f"models:/{logged.model_id}"
    assert logged.source_run_id == run.info.run_id and m["logged_model_mb"] > 0

    model_file = root / "runs/grpo/model/model.safetensors"
    md5 = hashlib.md5(model_file.read_bytes()).hexdigest()
    weights = ["--set", "grpo.reward_weights={au: 2.0}"]
    base = ["grpo", "--config", str(profile), *FAST, "--model", "tiny"]

    # killed after the last checkpoint (the folder holds checkpoint-2, no model): resumed to
    # the same model without a step more
    shutil.copytree(root / "runs/grpo/checkpoints", root / "runs/grpo-late/checkpoints")
    late = tmp_path / "late.json"
    argv = [*base, *weights, "--output-dir", "runs/grpo-late", "--result", str(late)]
    assert cli_main(argv) == 0
    assert json.loads(late.read_text())["metrics"]["global_step"] == 2
    assert (
        md5
        == hashlib.md5((root / "runs/grpo-late/model/model.safetensors").read_bytes()).hexdigest()
    )

    # other settings over the finished run's folder: refused, naming every change
    second = tmp_path / "g2.json"
    code = cli_main([*base, "--max-steps", "3", "--result", str(second)])
    assert code == 2 and not second.exists()
    err = capsys.readouterr().err
    assert "setting grpo.reward_weights.au: 2.0 -> (absent)" in err
    assert "setting grpo.max_steps: 2 -> 3" in err and "--fresh" in err

    # the same command again: the finished result, no training, the model's bytes unchanged
    again = tmp_path / "g3.json"
    assert cli_main([*base, *weights, "--result", str(again)]) == 0
    assert json.loads(again.read_text())["metrics"] == m
    assert hashlib.md5(model_file.read_bytes()).hexdigest() == md5

    # --fresh starts over under the new settings
    fresh = tmp_path / "g4.json"
    assert cli_main([*base, "--max-steps", "3", "--fresh", "--result", str(fresh)]) == 0
    m4 = json.loads(fresh.read_text())["metrics"]
    assert m4["resumed_from_step"] == 0 and m4["global_step"] == 3


def test_grpo_needs_the_sft_model(home, env, tmp_path, capsys):
    _, profile = home
    result = tmp_path / "r.json"
    code = cli_main(["grpo", "--config", str(profile), "--result", str(result)])
    assert code == 1
    assert "run `facial-r1 sft` first" in capsys.readouterr().err
    assert not result.exists()


def test_bad_reward_variant_is_a_usage_error(home, env, tmp_path):
    _, profile = home
    code = cli_main(
        [
            "grpo",
            "--config",
            str(profile),
            "--set",
            "grpo.reward_variant=fancy",
            "--result",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 2


def test_grpo_flags_a_noop_run_and_rolls_out_with_our_decoder(home, env, tmp_path, caplog):
    """lr 0: the weights stay put, the KL stays ~0, so the run is tagged and warned a no-op;
    rollouts come from the continuous-batching decoder through TRL's rollout_func."""
    root, profile = home
    result = tmp_path / "noop.json"
    with caplog.at_level("WARNING", logger="facial_r1.grpo"):
        code = cli_main(
            [
                "grpo",
                "--config",
                str(profile),
                *FAST,
                "--base-model",
                "tiny",
                "--fresh",
                "--output-dir",
                str(tmp_path / "noop"),
                "--set",
                "grpo.learning_rate=1e-12",
                "--set",
                "grpo.max_steps=2",
                "--set",
                "grpo.rollout_engine=continuous",
                "--result",
                str(result),
            ]
        )
    assert code == 0
    data = json.loads(result.read_text())
    m = data["metrics"]
    assert m["relative_weight_change"] == 0.0
    assert m["heldout_reward_after"] == pytest.approx(m["heldout_reward_before"])
    assert m["mean_kl"] < 1e-3 and m["grpo_noop"] == 1.0
    assert m["mean_completion_length"] > 0
    assert "GRPO did not move the policy" in caplog.text
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    assert client.get_run(data["mlflow_run_id"]).data.tags["grpo_noop"] == "true"


def test_continuous_rollout_engine_is_validated():
    with pytest.raises(Exception, match="rollout_engine"):
        from_section(GRPOStageConfig, {"rollout_engine": "fast"}, name="grpo")
    with pytest.raises(Exception, match="top_p"):
        from_section(GRPOStageConfig, {"rollout_engine": "continuous", "top_p": 0.9}, name="grpo")


def test_weight_change_and_noop_verdict():
    import torch
    from facial_r1_training.grpo_diagnostics import WeightChange, noop_verdict

    layer = torch.nn.Linear(4, 4, bias=False)
    torch.nn.init.ones_(layer.weight)  # ||theta|| = 4
    tracker = WeightChange()
    tracker.snapshot(layer)
    assert tracker.relative(layer) == 0.0
    with torch.no_grad():
        layer.weight[0, 0] += 2.0  # ||delta|| = 2
    assert tracker.relative(layer) == pytest.approx(0.5)
    assert noop_verdict(5e-4, 1e-3) is True and noop_verdict(5e-3, 1e-3) is False
    assert noop_verdict(None, 1e-3, weight_change=0.5) is False
    assert noop_verdict(None, 1e-3, weight_change=0.0) is True
