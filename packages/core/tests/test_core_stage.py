"""Core's stage contract without MLflow: setup hook, flag overrides, result JSON, exit codes.

The tracked path (MLflow runs, nesting, FAILED runs) is tested in the training package, whose
stages wrap this module with the torch setup hook.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from facial_r1_core import stage


@dataclass
class ToyConfig:
    size: int = 1
    name: str = "toy"


def parse(argv):
    parser = argparse.ArgumentParser()
    stage.add_stage_arguments(parser)
    return parser.parse_args(argv)


def test_untracked_stage_writes_result_and_runs_setup(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    profile = tmp_path / "p.yaml"
    profile.write_text("run: {seed: 5}\ntoy: {size: 2}\n")
    result = tmp_path / "out" / "result.json"
    seen = {}

    def body(ctx):
        seen["config"] = ctx.config
        return {"file": ctx.path("x.txt")}, {"size": ctx.config.size, "text": "dropped"}

    argv = ["--config", str(profile), "--set", "toy.size=3", "--result", str(result)]
    args = parse([*argv, "--no-mlflow"])
    code = stage.run_stage(
        args,
        stage="toy",
        config_cls=ToyConfig,
        body=body,
        setup=lambda run: seen.setdefault("run", dict(run)),
        flags={"name": "flag", "size": None},
    )
    assert code == stage.EXIT_OK
    assert seen["run"] == {"seed": 5}
    assert seen["config"] == ToyConfig(size=3, name="flag")
    written = json.loads(result.read_text())
    assert sorted(written) == sorted(stage.RESULT_KEYS)
    assert written["metrics"] == {"size": 3.0}
    assert written["outputs"] == {"file": str(tmp_path / "x.txt")}
    assert written["mlflow_run_id"] is None
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == written


def test_missing_default_profile_uses_section_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    monkeypatch.delenv("FACIAL_R1_CONFIG", raising=False)
    args = parse(["--no-mlflow", "--set", "toy.size=4"])
    with stage.stage_context(args, stage="toy", config_cls=ToyConfig) as ctx:
        assert ctx.config == ToyConfig(size=4) and ctx.mlflow_run_id is None


def test_configuration_errors_exit_2_and_failures_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("toy: {size: 1, colour: red}\n")
    args = parse(["--config", str(bad), "--no-mlflow"])
    assert stage.run_stage(args, stage="toy", config_cls=ToyConfig, body=None) == 2
    assert "colour" in capsys.readouterr().err
    missing = parse(["--config", str(tmp_path / "nope.yaml"), "--no-mlflow"])
    assert stage.run_stage(missing, stage="toy", config_cls=ToyConfig, body=None) == 2

    def boom(ctx):
        raise ValueError("broken input")

    good = tmp_path / "good.yaml"
    good.write_text("toy: {size: 1}\n")
    result = tmp_path / "r.json"
    args = parse(["--config", str(good), "--no-mlflow", "--result", str(result)])
    assert stage.run_stage(args, stage="toy", config_cls=ToyConfig, body=boom) == 1
    assert "broken input" in capsys.readouterr().err
    assert not result.exists()


def test_old_section_name_is_read_with_a_warning(tmp_path, capsys):
    from facial_r1_core.config import load_profile

    old = tmp_path / "old.yaml"
    old.write_text("synthesis: {limit: 3, top_k: 5}\n")
    profile = load_profile(old, ["synthesis.limit=4", "synthesize.top_k=6"])
    assert "synthesis" not in profile and profile["synthesize"] == {"limit": 4, "top_k": 6}
    err = capsys.readouterr().err
    assert f"{old}: section 'synthesis' is deprecated" in err
    assert "override 'synthesis.limit=4': section 'synthesis' is deprecated" in err
