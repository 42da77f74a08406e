"""The ``facial-r1`` command surface: every command is there, flags reach the config first."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from facial_r1_core.cli import build_parser
from facial_r1_core.cli import main as cli_main
from facial_r1_training import cli as training_cli

PROFILE = str(Path(__file__).parents[3] / "configs" / "tiny-cpu.yaml")

EXPECTED = {
    "": {
        "score",
        "data",
        "pipeline",
        "model",
        "sft",
        "grpo",
        "synthesize",
        "filter",
        "evaluate",
        "analyze",
    },
    "data": {
        "convert",
        "validate",
        "clean",
        "balance",
        "upscale",
        "mix",
        "demo-faces",
        "seed-sft",
    },
    "pipeline": {
        "prepare-data",
        "version-data",
        "demo-data",
        "render-k8s",
        "run",
        "summary",
        "demo",
    },
    "model": {"build-tiny", "log", "merge-lora"},
}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_expected_command_is_registered():
    parser = build_parser()
    assert parser.broken_commands == []
    top = _subcommands(parser)
    assert set(top) == EXPECTED[""]
    for group, verbs in EXPECTED.items():
        if group:
            assert set(_subcommands(top[group])) == verbs, group


def test_a_missing_command_module_is_an_error(monkeypatch):
    monkeypatch.setattr(training_cli, "COMMAND_MODULES", (*training_cli.COMMAND_MODULES, "nope"))
    with pytest.raises(ModuleNotFoundError, match="nope"):
        training_cli.register(argparse.ArgumentParser().add_subparsers())


# verb -> (module whose body is replaced, body attribute, section key the --model flag sets)
BODIES = {
    "sft": ("facial_r1_training.sft", "run_sft", "base_model"),
    "grpo": ("facial_r1_training.grpo", "run_grpo", "base_model"),
    "synthesize": ("facial_r1_training.synthesis", "_body", "model_path"),
    "evaluate": ("facial_r1_training.evaluation", "_body", "model_path"),
}


def _run_captured(monkeypatch, verb: str, argv: list[str], module: str, attr: str) -> dict:
    import importlib

    seen = {}

    def body(ctx):
        seen.update(hash=ctx.config_hash, config=ctx.config, run=ctx.mlflow_run_id)
        return {}, {}

    monkeypatch.setattr(importlib.import_module(module), attr, body)
    assert cli_main([verb, "--config", PROFILE, *argv]) == 0
    return seen


@pytest.mark.parametrize("verb", sorted(BODIES))
def test_model_flag_reaches_config_and_hash(verb, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    module, attr, key = BODIES[verb]
    a = _run_captured(monkeypatch, verb, ["--no-mlflow", "--model", "m/a"], module, attr)
    b = _run_captured(monkeypatch, verb, ["--no-mlflow", "--model", "m/b"], module, attr)
    assert getattr(a["config"], key) == "m/a" and getattr(b["config"], key) == "m/b"
    assert a["hash"] != b["hash"]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    assert [r["config_hash"] for r in printed] == [a["hash"], b["hash"]]


def test_filter_input_and_old_spellings_reach_config(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    new = _run_captured(
        monkeypatch, "filter", ["--no-mlflow", "s.jsonl"], "facial_r1_training.filtering", "_body"
    )
    old = _run_captured(
        monkeypatch,
        "filter",
        ["--no-mlflow", "--input", "s.jsonl"],
        "facial_r1_training.filtering",
        "_body",
    )
    assert new["config"].synthesized_file == "s.jsonl" and new["hash"] == old["hash"]
    assert "--input is deprecated" in capsys.readouterr().err
    sft = _run_captured(
        monkeypatch,
        "sft",
        ["--no-mlflow", "--train-file", "a.jsonl", "--train-file", "b.jsonl", "--base-model", "x"],
        "facial_r1_training.sft",
        "run_sft",
    )
    assert sft["config"].train_file == ["a.jsonl", "b.jsonl"] and sft["config"].base_model == "x"


def test_flags_are_logged_as_mlflow_params(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    seen = _run_captured(
        monkeypatch,
        "sft",
        ["--model", "m/a", "--max-steps", "3", "--set", "mlflow.artifact_root=" + str(tmp_path)],
        "facial_r1_training.sft",
        "run_sft",
    )
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(seen["run"])
    assert run.data.params["base_model"] == "m/a" and run.data.params["max_steps"] == "3"
    assert run.data.params["config_hash"] == seen["hash"] == run.data.tags["config_hash"]
