"""Filter stage: gate, dedupe, split, balance, review export, empty accepted set, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from facial_r1_core.schema import Record, read_records, write_jsonl
from facial_r1_training.filtering import FilterConfig, balance_records, run_filter
from facial_r1_training.testing import toy_completion, write_toy_dataset


def synthesized(root: Path, n: int) -> tuple[Path, list[Record]]:
    src = write_toy_dataset(root, n, dataset="Toy", split="pool")
    records = list(read_records(src))
    for rec in records:
        rec.meta_info["synthesis"] = {"attempts": 1}
    return src, records


def test_gate_dedupe_split_and_review_export(tmp_path):
    root = tmp_path / "data"
    _, records = synthesized(root, 12)
    bad = Record.from_dict(records[0].to_dict())
    bad.image, bad.id = records[1].image, "bad-id"
    bad.description = (
        "<think>Maybe raised cheeks (AU6), a smile (AU12).</think><answer>happiness</answer>"
    )
    rows = [*records, records[2], bad]  # one duplicate id, one record failing the gate
    synth = root / "Toy_pool_synth.jsonl"
    write_jsonl(synth, rows)
    seed = write_toy_dataset(root, 4, dataset="Toy", split="seed")
    rejected = root / "Toy_pool_synth_rejected.jsonl"
    rejected.write_text(
        json.dumps(
            {
                "line": 9,
                "record": records[3].to_dict(),
                "attempts": 6,
                "reasons": ["bad format"],
                "codes": ["bad_format"],
                "last_completion": "nonsense",
            }
        )
        + "\n"
    )
    cfg = FilterConfig(
        synthesized_file=str(synth),
        rejected_file=str(rejected),
        seed_file=str(seed),
        test_fraction=0.5,
        review_dir=str(tmp_path / "review"),
        work_dir=str(tmp_path / "work"),
    )
    out = run_filter(cfg)
    s = out.stats
    assert (s["synthesized_read"], s["gate_accepted"], s["gate_rejected"]) == (14, 13, 1)
    assert s["gate_reject_codes"] == {"negative_wording": 1}
    assert s["duplicates_removed"] == 1
    assert s["train_synthesized"] + s["test"] == 12 and s["test"] > 0
    grown = list(read_records(out.outputs["train"]))
    test = list(read_records(out.outputs["test"]))
    assert len(grown) == 4 + s["train_synthesized"] == s["grown"]
    assert not {r.id for r in grown} & {r.id for r in test}
    assert len({r.id for r in grown}) == len(grown)
    html = Path(out.outputs["review_html"]).read_text()
    assert html.count("data:image/png;base64,") == s["review_rows"] >= s["test"]
    assert "<select>" in html and "accepted" in html
    with open(out.outputs["review_csv"]) as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == s["review_rows"]
    assert {"AUs", "labels", "reasoning", "auto_verdict", "review_decision"} <= set(table[0])
    assert all(row["review_decision"] == "" for row in table)


def test_empty_accepted_set_gives_seed_only(tmp_path):
    root = tmp_path / "data"
    synth = root / "Toy_pool_synth.jsonl"
    root.mkdir(parents=True)
    synth.write_text("")
    seed = write_toy_dataset(root, 5, dataset="Toy", split="seed")
    cfg = FilterConfig(
        synthesized_file=str(synth),
        seed_file=str(seed),
        review_dir=str(tmp_path / "review"),
        work_dir=str(tmp_path / "work"),
    )
    out = run_filter(cfg)
    assert out.stats["gate_accepted"] == 0 and out.stats["grown"] == 5
    assert [r.id for r in read_records(out.outputs["train"])] == [r.id for r in read_records(seed)]
    assert Path(out.outputs["test"]).read_text() == ""
    assert "No samples" in Path(out.outputs["review_html"]).read_text()


def test_seed_in_other_root_resolves_through_a_link(tmp_path):
    synth_root, seed_root = tmp_path / "synth", tmp_path / "seedroot"
    _, records = synthesized(synth_root, 4)
    synth = synth_root / "Toy_pool_synth.jsonl"
    write_jsonl(synth, records)
    seed = write_toy_dataset(seed_root, 3, dataset="Seedset")
    cfg = FilterConfig(
        synthesized_file=str(synth),
        seed_file=str(seed),
        test_fraction=0.0,
        review_dir=str(tmp_path / "review"),
        work_dir=str(tmp_path / "work"),
    )
    out = run_filter(cfg)
    grown_path = Path(out.outputs["train"])
    grown = list(read_records(grown_path))
    assert len(grown) == 7
    assert all(r.image_path(grown_path.parent).is_file() for r in grown)


def test_balance_cap_and_resample():
    recs = [
        Record.create(
            dataset="D",
            image=f"{i}.png",
            question="q",
            labels=[e],
            description=toy_completion([], e),
        )
        for i, e in enumerate(["fear"] * 9 + ["anger"] * 3 + ["sadness"] * 1)
    ]
    capped = balance_records(recs, "cap")  # target: the median class size (3)
    counts = {e: sum(r.labels[0] == e for r in capped) for e in ("fear", "anger", "sadness")}
    assert counts == {"fear": 3, "anger": 3, "sadness": 1}
    resampled = balance_records(recs, "resample", max_per_class=4, max_oversample=3.0)
    counts = {e: sum(r.labels[0] == e for r in resampled) for e in ("fear", "anger", "sadness")}
    assert counts == {"fear": 4, "anger": 4, "sadness": 3}
    copies = [r for r in resampled if r.meta_info.get("balance_copy")]
    assert len(copies) == 1 + 2
    assert balance_records(recs, "none") == recs


def test_filter_cli_writes_result(tmp_path, monkeypatch):
    from facial_r1_core.cli import main

    root = tmp_path / "data"
    _, records = synthesized(root, 6)
    synth = root / "Toy_pool_synth.jsonl"
    write_jsonl(synth, records)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    result = tmp_path / "result.json"
    code = main(
        [
            "filter",
            "--config",
            str(Path(__file__).parents[3] / "configs" / "tiny-cpu.yaml"),
            "--input",
            str(synth),
            "--set",
            "filter.seed_file=",
            "--set",
            "filter.balance=cap",
            "--set",
            f"filter.review_dir={tmp_path}/review",
            "--result",
            str(result),
        ]
    )
    assert code == 0
    data = json.loads(result.read_text())
    assert data["stage"] == "filter" and data["metrics"]["gate_accepted"] == 6
    assert Path(data["outputs"]["review_html"]).is_file()
