"""benchmarks/report.py: a timed command becomes README rows, written between the markers only."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("facial_r1_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_iteration(project: Path, iteration: int, finished: float) -> dict:
    summary = {
        "iteration": iteration,
        "train_file": "data/DemoFaces_seed.jsonl",
        "started": finished - 200.0,
        "finished": finished,
        "stages": {
            "sft": {"wall_time_s": 61.3, "metrics": {"samples": 300}},
            "grpo": {"wall_time_s": 108.4, "metrics": {}},
            "synthesize": {"wall_time_s": 5.5, "metrics": {"read": 256, "accepted": 106}},
        },
        "effect": {
            "sft": {"emotion_accuracy": 0.4, "au_f1_micro": 0.5897},
            "grpo": {"emotion_accuracy": 0.4125, "au_f1_micro": 0.5933},
            "delta": {"emotion_accuracy": 0.0125, "au_f1_micro": 0.0036},
        },
        "promotion": {"candidate_version": "1", "candidate_score": 0.5029, "promoted": True},
    }
    folder = project / "runs" / "iterations" / f"iter-{iteration:03d}-abc"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (project / "runs" / "iterations" / "latest-summary.json").write_text(json.dumps(summary))
    return summary


def test_a_timed_iteration_becomes_rows_with_its_model_and_command(report, tmp_path):
    # the "command" writes an iteration summary and prints a pytest summary line
    script = (
        "import json, sys, time, pathlib\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_report import _fake_iteration\n"
        "_fake_iteration(pathlib.Path('.'), 1, time.time())\n"
        "print('==== 12 passed, 1 warning in 3.50s ====')\n"
        "print('[orchestrator] ==== 3 passed in 9.01s (0:00:09) ====')\n"
    )
    (tmp_path / "iteration.py").write_text(script)
    code = report.time_command([sys.executable, "iteration.py"], tmp_path)
    assert code == 0
    (record,) = json.loads((tmp_path / "runs" / "figures.json").read_text())
    assert record["summary"] == "runs/iterations/iter-001-abc/summary.json"
    assert record["pytest"] == ["12 passed, 1 warning in 3.50s", "orchestrator: 3 passed in 9.01s"]
    assert record["built_environments"] is True  # no .venv in tmp_path

    table = report.table([tmp_path])
    lines = table.splitlines()
    assert lines[0] == "| what | model | command | figure | measured |"
    assert len(lines) == 2 + 4  # wall clock, stage times, effect, promotion
    assert "from a fresh clone" in lines[2] and "12 passed" in lines[2]
    assert "SFT 0.4 / 0.5897 -> GRPO 0.4125 / 0.5933 (+0.0125 / +0.0036)" in table
    assert "registered v1" in table and "promoted to `champion`" in table
    assert all(line.count(" | ") == 4 for line in lines[2:])  # five cells in every row


def test_a_command_that_ran_no_iteration_gets_one_row(report, tmp_path):
    _fake_iteration(tmp_path, 1, finished=1.0)  # an old iteration: not this command's
    assert report.time_command([sys.executable, "-c", "raise SystemExit(3)"], tmp_path) == 3
    (row,) = report.rows(tmp_path)
    assert "exit code 3" in row[3]


def test_readme_is_rewritten_between_the_markers_only(report, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold table\n{report.END}\nrest\n")
    report.write_readme(readme, "| new |")
    assert readme.read_text() == f"intro\n{report.BEGIN}\n| new |\n{report.END}\nrest\n"
    (tmp_path / "other.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        report.write_readme(tmp_path / "other.md", "| new |")
