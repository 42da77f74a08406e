"""Evaluation: metrics from real completions, skipped images, report files, judge, CLI."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from facial_r1_core.schema import Record, read_records, write_jsonl
from facial_r1_training.evaluation import EvaluateConfig, evaluate
from facial_r1_training.generation import ScriptedBackend
from facial_r1_training.judge import JudgeConfig, JudgeResult, judge_pairs, summarize
from facial_r1_training.testing import toy_completion, write_toy_dataset

EMOS = ["anger", "happiness", "sadness", "surprise"]


def test_metrics_report_and_plots(tmp_path):
    test_file = write_toy_dataset(tmp_path / "data", 8, split="test")
    records = list(read_records(test_file))
    # one missing image: skipped with its reason, counted
    extra = Record.create(
        dataset="Toy", image="gone.png", question="q", AUs=["AU4"], labels=["anger"]
    )
    write_jsonl(test_file, [*records, extra])

    def script(req, i):
        rec = records[i]
        if i == 0:  # wrong emotion, one AU missing
            return "<think>Cheeks raised (AU6).</think><answer>sadness</answer>"
        if i == 1:
            return "unformatted answer"
        return rec.description

    backend = ScriptedBackend(script, batch_size=3)
    report, outputs = evaluate(
        EvaluateConfig(),
        backend,
        emotions=EMOS,
        output_dir=tmp_path / "out",
        test_file=test_file,
        progress=False,
    )
    assert (report["read"], report["n"], report["skipped"]) == (9, 8, 1)
    assert "gone.png" in report["skipped_lines"][0]["reason"]
    assert report["format_rate"] == pytest.approx(7 / 8)
    assert report["emotion"]["accuracy"] == pytest.approx(6 / 8)
    # records 0 and 4 are happy (0 answered sadness), 1 and 5 sad (1 unformatted)
    assert report["emotion"]["per_class"]["happiness"] == 0.5
    assert report["emotion"]["per_class"]["sadness"] == 0.5
    assert report["au"]["micro_f1"] < 1.0 and report["au"]["per_au"]["AU6"]["f1"] > 0
    assert report["rouge_l"] < 1.0 and report["rouge_l_n"] == 8
    assert backend.batch_sizes == [3, 3, 2]
    saved = json.loads(Path(outputs["report"]).read_text())
    assert saved["headline"]["emotion_accuracy"] == pytest.approx(0.75)
    md = Path(outputs["report_md"]).read_text()
    assert "| emotion_accuracy | 0.75 |" in md and "gone.png" in md
    for name in ("confusion", "au_f1"):
        assert Path(outputs[name]).read_bytes()[:4] == b"\x89PNG"
    preds = [json.loads(x) for x in Path(outputs["predictions"]).read_text().splitlines()]
    assert len(preds) == 8 and preds[1]["format_valid"] is False


class _FakeJudge(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        prompt = body["messages"][0]["content"]
        if "FAIL" in prompt:
            self.send_response(400)
            self.end_headers()
            return
        reply = {"choices": [{"message": {"content": '{"score": 7, "reason": "close"}'}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = HTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_judge_failures_are_failures_not_zeros(judge_url):
    cfg = JudgeConfig(enabled=True, base_url=judge_url, model="fake", retries=0)
    results = judge_pairs(cfg, ["a smile (AU12)", "FAIL this one"], ["smile (AU12)", "ref"])
    assert results[0] == JudgeResult(7.0, None, "close")
    assert results[1].score is None and "HTTP 400" in results[1].error
    summary = summarize(results)
    assert summary == {"judge_n": 2, "judge_ok": 1, "judge_failed": 1, "judge_score_mean": 7.0}


def test_judge_unreachable_endpoint_is_reported(tmp_path):
    cfg = JudgeConfig(
        enabled=True, base_url="http://127.0.0.1:9/v1", model="m", retries=0, timeout_s=2
    )
    [result] = judge_pairs(cfg, ["x"], ["y"])
    assert result.score is None and result.error.startswith("request failed")


def test_judge_inside_evaluation(tmp_path, judge_url):
    test_file = write_toy_dataset(tmp_path / "data", 4, split="test")
    recs = list(read_records(test_file))
    backend = ScriptedBackend(lambda req, i: recs[i].description)
    cfg = EvaluateConfig(judge={"enabled": True, "base_url": judge_url, "model": "fake"})
    report, _ = evaluate(
        cfg,
        backend,
        emotions=EMOS,
        output_dir=tmp_path / "out",
        test_file=test_file,
        progress=False,
    )
    assert report["judge_ok"] == 4 and report["judge_score_mean"] == 7.0
    assert report["format_rate"] == 1.0 and report["au"]["micro_f1"] == 1.0


def test_evaluate_cli_with_tiny_model(tmp_path, monkeypatch):
    from facial_r1_core.cli import main
    from facial_r1_training.models import build_tiny

    build_tiny(tmp_path / "tiny")
    test_file = write_toy_dataset(tmp_path / "data", 6, split="test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    result = tmp_path / "result.json"
    code = main(
        [
            "evaluate",
            "--config",
            str(Path(__file__).parents[3] / "configs" / "tiny-cpu.yaml"),
            "--model",
            str(tmp_path / "tiny"),
            str(test_file),
            "--output-dir",
            str(tmp_path / "eval"),
            "--result",
            str(result),
            "--set",
            "evaluate.max_new_tokens=8",
        ]
    )
    assert code == 0
    data = json.loads(result.read_text())
    m = data["metrics"]
    assert m["n"] == 6 and m["format_rate"] == 0.0  # a random-init model: honest zeros
    assert 0.0 <= m["au_f1_micro"] <= 1.0 and data["mlflow_run_id"]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    artifacts = {
        a.path for a in mlflow.MlflowClient().list_artifacts(data["mlflow_run_id"], "evaluation")
    }
    assert {"evaluation/confusion.png", "evaluation/au_f1.png", "evaluation/report.md"} <= (
        artifacts
    )


def test_toy_completion_scores_perfectly(tmp_path):
    from facial_r1_training.evaluation import compute_metrics

    recs = list(read_records(write_toy_dataset(tmp_path, 4)))
    report = compute_metrics(recs, [toy_completion(r.AUs, r.labels[0]) for r in recs], EMOS)
    assert report["emotion"]["accuracy"] == 1.0 and report["au"]["macro_f1"] == 1.0
