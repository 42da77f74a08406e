"""`facial-r1 score`: outputs, summary, malformed lines, exit codes, speed."""

import json
import subprocess
import sys
import time

from facial_r1_core.cli import main
from facial_r1_core.score import score_file

GOOD = "<think>Cheeks raised (AU6), lip corners pulled (AU12).</think><answer>happy</answer>"


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def good(i):
    return json.dumps(
        {"id": i, "completion": GOOD, "AUs": ["AU6", "AU12"], "labels": ["happiness"]}
    )


def test_scores_and_passes_fields_through(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(
        src,
        [
            good(1),
            json.dumps(
                {
                    "id": 2,
                    "completion": "<answer>sad</answer>",
                    "AUs": ["AU1"],
                    "labels": ["sad"],
                    "extra": 5,
                }
            ),
        ],
    )
    summary = score_file(src, out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["rewards"] == {"au": 1.0, "accuracy": 1.0, "format": 1.0, "total": 3.0}
    assert rows[0]["filter"] == {"accepted": True, "reasons": [], "codes": []}
    assert rows[0]["parsed"]["aus"] == ["AU6", "AU12"] and rows[0]["parsed"]["emotion"] == [
        "happiness"
    ]
    assert rows[1]["extra"] == 5 and rows[1]["rewards"]["total"] == 1.0
    assert summary["acceptance_rate"] == 0.5 and summary["emotion_accuracy"] == 1.0


def test_malformed_lines_are_counted_not_fatal_and_do_not_shift(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(
        src,
        [
            good(1),
            "{not json",
            json.dumps({"id": 3, "AUs": []}),
            json.dumps({"id": 4, "completion": 7}),
            json.dumps({"id": 5, "completion": GOOD, "labels": ["bored"]}),
            json.dumps([1]),
            good(7),
        ],
    )
    code = main(["score", str(src), "--output", str(out), "--json"])
    assert code == 2 and not out.exists()  # the default: stop before any work
    assert f"{src}:3: missing field 'completion'" in capsys.readouterr().err
    code = main(["score", str(src), "--output", str(out), "--json", "--skip-bad-records"])
    assert code == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["lines_read"] == 7 and summary["scored"] == 2 and summary["malformed"] == 5
    assert [m["line"] for m in summary["malformed_lines"]] == [2, 3, 4, 5, 6]
    assert f"{src}:3: malformed line: missing field 'completion'" in captured.err
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [1, 7]


def test_exit_codes(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [good(1)])
    assert main(["score", str(src), "--output", str(out)]) == 0
    assert "filter acceptance rate" in capsys.readouterr().out
    assert main(["score", str(tmp_path / "nope.jsonl"), "--output", str(out)]) == 2
    proc = subprocess.run(
        [sys.executable, "-m", "facial_r1_core.cli", "score"], capture_output=True
    )
    assert proc.returncode == 2


def test_reference_variant(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(
        src,
        [
            json.dumps(
                {
                    "completion": "<think>x</think><answer>fear</answer>",
                    "AUs": ["AU1"],
                    "labels": [],
                }
            )
        ],
    )
    summary = score_file(src, out, "reference")
    assert summary["mean_rewards"] == {"au": -1.0, "accuracy": 0.5, "format": 1.0, "total": 0.5}


def test_thousands_of_lines_in_seconds(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [good(i) for i in range(3000)])
    started = time.perf_counter()
    summary = score_file(src, out)
    assert summary["scored"] == 3000
    assert time.perf_counter() - started < 30  # loose: the benchmark measures lines/s exactly
