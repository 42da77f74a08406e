"""Tests of the template teacher and the ``seed-sft`` stage (offline)."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from facial_r1_core.schema import Record, read_records, write_jsonl
from facial_r1_core.vocab import AU_NAMES, EMOTIONS
from facial_r1_data import seed as seed_mod
from facial_r1_data.demo_faces import PROTOTYPES, sample_spec
from facial_r1_data.seed import SeedConfig, build_seed, select_balanced
from facial_r1_data.teacher_template import (
    TemplateTeacher,
    corpus,
    forbidden_words,
    template_completion,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image


def _check():
    from facial_r1_core.filter import check  # the lead's filter: the one judge of completions

    return check


@settings(max_examples=300, deadline=None)
@given(
    aus=st.sets(st.sampled_from(sorted(AU_NAMES)), max_size=8),
    emotion=st.sampled_from(EMOTIONS),
    seed=st.integers(0, 10_000),
    verbosity=st.sampled_from(["short", "long"]),
    unilateral=st.booleans(),
)
def test_every_template_completion_passes_the_core_filter(
    aus, emotion, seed, verbosity, unilateral
):
    text = template_completion(
        sorted(aus), emotion, rng=random.Random(seed), verbosity=verbosity, unilateral=unilateral
    )
    result = _check()(text, sorted(aus), [emotion])
    assert result.accepted, (text, result.reasons)
    assert not forbidden_words(text)


def test_the_corpus_holds_no_forbidden_words():
    for phrase in corpus():
        assert not forbidden_words(phrase), phrase


def test_prototype_completions_are_varied_and_short():
    texts = Counter()
    for i in range(60):
        texts[
            template_completion(sorted(PROTOTYPES["anger"][0]), "anger", rng=random.Random(i))
        ] += 1
    assert len(texts) >= 20  # phrasing varies
    for text in texts:
        assert len(text.split()) < 60  # fits the tiny model's completion budget
    long = template_completion(
        ["AU4", "AU5", "AU7", "AU23"], "anger", rng=random.Random(0), verbosity="long"
    )
    assert "anger" in long.split("</think>")[0] and long.count("(AU") >= 8


def test_neutral_without_aus_and_contempt_one_sided():
    text = template_completion([], "neutral", rng=random.Random(1))
    assert "AU" not in text.split("</think>")[0]
    assert _check()(text, [], ["neutral"]).accepted
    smirk = template_completion(["AU12", "AU14"], "contempt", rng=random.Random(2), unilateral=True)
    assert "one" in smirk or "that side" in smirk


def test_teacher_is_deterministic_per_record():
    rec = Record.create(
        dataset="D", image="a.png", question="q", AUs=["AU6", "AU12"], labels=["happiness"]
    )
    other = Record.create(
        dataset="D", image="b.png", question="q", AUs=["AU6", "AU12"], labels=["happiness"]
    )
    t = TemplateTeacher(seed=3)
    assert t.complete_record(rec) == t.complete_record(rec)
    variants = {TemplateTeacher(seed=s).complete_record(r) for s in range(6) for r in (rec, other)}
    assert len(variants) > 3


def test_select_balanced_is_seeded_and_balanced():
    recs = [
        Record.create(dataset="D", image=f"{i}.png", question="q", labels=[e])
        for i, e in enumerate(["anger"] * 10 + ["fear"] * 10 + ["neutral"] * 2)
    ]
    a = select_balanced(recs, 9, seed=0)
    assert [r.id for r in a] == [r.id for r in select_balanced(recs, 9, seed=0)]
    assert Counter(r.labels[0] for r in a) == {"anger": 4, "fear": 3, "neutral": 2}
    assert len(select_balanced(recs, 100, seed=0)) == 22


def _dataset(tmp_path: Path, n: int = 24) -> Path:
    """A small dataset with images, one missing image, one undecodable, bad and unlabelled lines."""
    root = tmp_path / "data"
    (root / "Faces").mkdir(parents=True)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        emotion = EMOTIONS[i % len(EMOTIONS)]
        spec = sample_spec(rng, emotion)
        name = f"{i:03d}.png"
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / "Faces" / name)
        rows.append(
            Record.create(
                dataset="Faces",
                image=name,
                question="q",
                AUs=spec.aus,
                labels=[emotion],
                meta_info={"unilateral": spec.unilateral},
            )
        )
    rows.append(
        Record.create(
            dataset="Faces", image="missing.png", question="q", AUs=["AU4"], labels=["anger"]
        )
    )
    (root / "Faces" / "broken.png").write_bytes(b"not a png")
    rows.append(
        Record.create(
            dataset="Faces", image="broken.png", question="q", AUs=["AU9"], labels=["disgust"]
        )
    )
    rows.append(Record.create(dataset="Faces", image="000.png", question="unlabelled", AUs=["AU1"]))
    rows.append(
        Record.create(
            dataset="Faces", image="001.png", question="two labels", labels=["anger", "fear"]
        )
    )
    path = root / "Faces_train.jsonl"
    write_jsonl(path, rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"dataset": "Faces"}\n')  # invalid: no image, no question
    return path


def test_build_seed_counts_reconcile_and_bad_images_are_quarantined(tmp_path):
    path = _dataset(tmp_path)
    report = build_seed(SeedConfig(count=100), path, progress=False)
    assert report.read == 29 and report.invalid == 1 and report.ineligible == 2
    assert report.eligible == 26 and report.selected == 26
    assert report.accepted == 24 and report.rejected == 2
    assert report.reasons == {"bad_image": 2}
    accepted = list(read_records(tmp_path / "data" / "Faces_seed.jsonl", check_id=True))
    rejected = list(read_records(tmp_path / "data" / "Faces_seed_rejected.jsonl"))
    assert len(accepted) == 24 and len(rejected) == 2
    check = _check()
    for rec in accepted:
        assert check(rec.description, rec.AUs, rec.labels).accepted
        assert rec.meta_info["seed_teacher"] == "template"
        assert rec.image_path(tmp_path / "data").is_file()
    reasons = " ".join(r.meta_info["rejected"]["reasons"][0] for r in rejected)
    assert "image missing" in reasons and "image undecodable" in reasons


def test_build_seed_count_and_determinism(tmp_path):
    path = _dataset(tmp_path)
    out_a, out_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ra = build_seed(
        SeedConfig(count=8), path, output=out_a, rejected=tmp_path / "ra.jsonl", progress=False
    )
    build_seed(
        SeedConfig(count=8), path, output=out_b, rejected=tmp_path / "rb.jsonl", progress=False
    )
    assert ra.selected == 8 and out_a.read_bytes() == out_b.read_bytes()
    labels = Counter(r.labels[0] for r in read_records(out_a))
    assert len(labels) == 8  # one of each emotion


def test_build_seed_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"seed_sft\.input"):
        build_seed(SeedConfig(), tmp_path / "nope.jsonl", progress=False)


def _run(argv):
    parser = argparse.ArgumentParser()
    seed_mod.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_follows_the_stage_contract(tmp_path, capsys):
    path = _dataset(tmp_path)
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"seed_sft:\n  input: {path}\n  count: 300\n  verbosity: long\n")
    result = tmp_path / "result.json"
    code = _run(
        [
            "seed-sft",
            "--config",
            str(profile),
            "--count",
            "5",
            "--result",
            str(result),
            "--no-mlflow",
            "--no-progress",
        ]
    )
    assert code == 0
    data = json.loads(result.read_text())
    assert data["stage"] == "data seed-sft" and data["metrics"]["selected"] == 5
    assert data["metrics"]["accepted"] + data["metrics"]["rejected"] == 5
    assert Path(data["outputs"]["seed_jsonl"]).name == "Faces_seed.jsonl"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == data


def test_cli_unknown_teacher_fails_cleanly(tmp_path, capsys):
    path = _dataset(tmp_path)
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"seed_sft:\n  input: {path}\n  teacher: gpt\n")
    assert _run(["seed-sft", "--config", str(profile), "--no-mlflow", "--no-progress"]) == 1
    assert "seed_sft.teacher" in capsys.readouterr().err
