"""Evaluation as in the paper (AU-free frames, protocol averages, REGE) and its guards (empty test
set, negative limit, n and the test-set fingerprint that promotion compares)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from facial_r1_core.config import ConfigError
from facial_r1_core.schema import Record, read_records, write_jsonl
from facial_r1_training.evaluation import (
    EmptyTestSetError,
    EvaluateConfig,
    compute_metrics,
    evaluate,
    headline,
)
from facial_r1_training.evaluation import fingerprint_test_set as fingerprint
from facial_r1_training.generation import ScriptedBackend
from facial_r1_training.testing import write_toy_dataset

EMOS = ["anger", "happiness", "neutral", "sadness", "surprise"]
CALM = "<think>A calm face, relaxed brows.</think><answer>neutral</answer>"
FROWN = "<think>Brows lowered (AU4).</think><answer>neutral</answer>"


def rec(i, aus=(), dataset="BP4D", coded="all", description=""):
    meta = {"aus_annotated": coded} if coded else {}
    return Record.create(
        dataset=dataset,
        image=f"{i}.png",
        question="q",
        AUs=aus,
        labels=["neutral"],
        description=description,
        meta_info=meta,
    )


def test_au_free_frames_count_in_au_f1():
    records = [rec(0, ["AU4"]), rec(1), rec(2)]
    silent = compute_metrics(records, [FROWN, CALM, CALM], EMOS)
    noisy = compute_metrics(records, [FROWN, FROWN, FROWN], EMOS)
    assert silent["au"]["n"] == 3 and silent["au"]["au_free"] == 2
    assert silent["au"]["micro_f1"] == 1.0
    # two false positives on the AU-free frames now count: F1 = 2*1 / (2*1 + 2)
    assert noisy["au"]["micro_f1"] == pytest.approx(0.5)
    # without the annotation convention the frames are not AU-annotated and not scored
    bare = [rec(0, ["AU4"]), rec(1, coded=None), rec(2, coded=None)]
    assert compute_metrics(bare, [FROWN] * 3, EMOS)["au"]["n"] == 1


def test_protocol_averages_for_bp4d_and_disfa_records():
    records = [rec(0, ["AU1", "AU2"]), rec(1, ["AU1"], dataset="DISFA"), rec(2, ["AU4"], "Toy")]
    text = "<think>Brows raised (AU1).</think><answer>neutral</answer>"
    report = compute_metrics(records, [text] * 3, EMOS)
    bp4d, disfa = report["au_protocols"]["bp4d"], report["au_protocols"]["disfa"]
    assert bp4d["n"] == 1 and bp4d["average_f1"] == pytest.approx(1 / 12)
    assert disfa["n"] == 1 and disfa["average_f1"] == pytest.approx(1 / 8)
    h = headline(report)
    assert h["au_f1_bp4d12"] == pytest.approx(1 / 12, abs=1e-4)
    assert h["au_f1_disfa8"] == pytest.approx(1 / 8, abs=1e-4)
    plain = compute_metrics([rec(0, ["AU4"], "Toy")], [FROWN], EMOS)
    assert "au_protocols" not in plain and "au_f1_bp4d12" not in headline(plain)


def test_rege_reported_when_descriptions_exist():
    records = [rec(0, ["AU4"], description=FROWN), rec(1, description=CALM)]
    report = compute_metrics(records, [FROWN, CALM], EMOS)
    assert report["rouge_l"] == 1.0
    h = headline(report)
    assert h["rege_emotion"] == 200.0 and h["rege_au"] == 200.0
    wrong = compute_metrics(records, [CALM, FROWN], EMOS)
    assert 0 < wrong["rege_emotion"] < 200 and wrong["rege_au"] < wrong["rege_emotion"]
    assert "rege_emotion" not in compute_metrics([rec(0, ["AU4"])], [FROWN], EMOS)


def run(tmp_path, test_file, limit=0, out="out"):
    records = {r.id: r for r in read_records(test_file)}

    def script(req, i):
        return CALM

    report, outputs = evaluate(
        EvaluateConfig(limit=limit),
        ScriptedBackend(script, batch_size=4),
        emotions=EMOS,
        output_dir=tmp_path / out,
        test_file=test_file,
        progress=False,
    )
    assert len(records) >= report["n"]
    return report, outputs


def test_fingerprint_identifies_the_scored_records(tmp_path):
    test_file = write_toy_dataset(tmp_path / "data", 6, split="test")
    full, outputs = run(tmp_path, test_file)
    assert full["n"] == 6 and len(full["test_set_fingerprint"]) == 64
    saved = json.loads(Path(outputs["report"]).read_text())
    assert saved["test_set_fingerprint"] == full["test_set_fingerprint"]
    # a limit scores other records: another fingerprint
    five, _ = run(tmp_path, test_file, limit=5, out="five")
    assert five["n"] == 5 and five["test_set_fingerprint"] != full["test_set_fingerprint"]
    # the same records in another order: the same fingerprint
    records = list(read_records(test_file))
    write_jsonl(test_file, records[::-1])
    again, _ = run(tmp_path, test_file, out="again")
    assert again["test_set_fingerprint"] == full["test_set_fingerprint"]
    # a changed label: another fingerprint
    records[0].labels = ["surprise"]
    assert fingerprint(records) != full["test_set_fingerprint"]


def test_nothing_to_score_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(EmptyTestSetError, match="holds no records"):
        run(tmp_path, empty)
    gone = tmp_path / "gone.jsonl"
    write_jsonl(gone, [rec(0, ["AU4"], dataset="Nowhere")])
    with pytest.raises(EmptyTestSetError, match=r"all skipped.*image missing"):
        run(tmp_path, gone)
    with pytest.raises(ConfigError, match=r"evaluate\.limit"):
        run(tmp_path, write_toy_dataset(tmp_path / "d", 2), limit=-1)
    assert not (tmp_path / "out").exists()


def test_cli_empty_test_file_and_negative_limit_exit_2(tmp_path, monkeypatch, capsys):
    from facial_r1_core.cli import main

    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = write_toy_dataset(tmp_path / "data", 2, split="test")
    config = str(Path(__file__).parents[3] / "configs" / "tiny-cpu.yaml")
    for test_file, extra, message in (
        (empty, [], "holds no records"),
        (good, ["--limit", "-3"], "evaluate.limit: must be >= 0, got -3"),
        (good, ["--set", "evaluate.limit=-1"], "got -1"),
    ):
        result = tmp_path / "result.json"
        code = main(
            [
                "evaluate",
                "--config",
                config,
                "--model",
                str(tmp_path / "no-model"),
                str(test_file),
                "--result",
                str(result),
                "--no-mlflow",  # a ConfigError inside the stage ends its MLflow run FAILED
                *extra,
            ]
        )
        assert code == 2
        assert message in capsys.readouterr().err
        assert not result.exists() and not (tmp_path / "runs").exists()
