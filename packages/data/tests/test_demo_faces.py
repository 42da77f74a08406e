"""Tests of the procedural demo faces (``facial-r1 data demo-faces``)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
from facial_r1_core.prompts import DEFAULT_QUESTION
from facial_r1_core.schema import read_records
from facial_r1_core.vocab import BASIC_EMOTIONS, EMOTIONS
from facial_r1_data import demo_faces
from facial_r1_data.demo_faces import (
    PROTOTYPES,
    DemoFacesConfig,
    conflicts,
    contact_sheet,
    generate,
    nearest_emotion,
    sample_spec,
)
from facial_r1_data.faces_draw import DRAWABLE_AUS, FaceStyle, draw_face
from PIL import Image


def test_every_prototype_variant_is_its_own_nearest_emotion():
    for emotion, variants in PROTOTYPES.items():
        for variant in variants:
            assert nearest_emotion(variant) == emotion
            assert not conflicts(variant), (emotion, variant)


def test_ties_have_no_label():
    assert nearest_emotion({"AU12"}) is None  # happiness vs contempt
    assert nearest_emotion({"AU6"}) is None  # happiness vs neutral
    assert nearest_emotion({"AU15"}) == "neutral"


def test_sampled_specs_are_strictly_nearest_and_conflict_free():
    rng = random.Random(7)
    seen_drop = seen_extra = 0
    for i in range(800):
        emotion = EMOTIONS[i % len(EMOTIONS)]
        spec = sample_spec(rng, emotion)
        assert spec.emotion == emotion
        assert nearest_emotion(spec.aus) == emotion
        assert not conflicts(spec.aus)
        assert spec.aus <= set(DRAWABLE_AUS)
        assert spec.unilateral == (emotion == "contempt")
        seen_drop += bool(spec.dropped)
        seen_extra += bool(spec.extra)
    assert seen_drop > 50 and seen_extra > 100  # variation really happens


def test_seven_emotions_without_contempt():
    rng = random.Random(0)
    for _ in range(200):
        spec = sample_spec(rng, "happiness", emotions=BASIC_EMOTIONS)
        assert nearest_emotion(spec.aus, BASIC_EMOTIONS) == "happiness"


# Regions in face units (x0, y0, x1, y1) where each AU must change the picture.
REGIONS = {
    "brows": (-0.3, -0.33, 0.3, -0.1),
    "eyes": (-0.26, -0.15, 0.26, 0.0),
    "cheeks": (-0.3, -0.1, 0.3, 0.12),
    "nose": (-0.09, -0.08, 0.09, 0.13),
    "mouth": (-0.22, 0.1, 0.22, 0.4),
    "chin": (-0.15, 0.25, 0.15, 0.45),
    "jaw": (-0.4, 0.1, 0.4, 0.55),  # AU26 also lengthens the face
}
AU_REGION = {
    "AU1": "brows",
    "AU2": "brows",
    "AU4": "brows",
    "AU5": "eyes",
    "AU7": "eyes",
    "AU43": "eyes",
    "AU6": "cheeks",
    "AU9": "nose",
    "AU10": "mouth",
    "AU12": "mouth",
    "AU14": "mouth",
    "AU15": "mouth",
    "AU16": "mouth",
    "AU17": "chin",
    "AU20": "mouth",
    "AU23": "mouth",
    "AU24": "mouth",
    "AU25": "mouth",
    "AU26": "jaw",
}


@pytest.mark.parametrize("au", DRAWABLE_AUS)
def test_each_au_changes_its_own_region(au):
    style = FaceStyle(noise=0.0, rotation=0.0)
    size = 112
    base = np.asarray(draw_face(set(), style, size=size), dtype=np.float32)
    shown = np.asarray(draw_face({au}, style, size=size), dtype=np.float32)
    diff = np.abs(shown - base).sum(axis=2) > 30
    assert diff.sum() >= 8, f"{au} is barely visible ({diff.sum()} pixels changed)"
    x0, y0, x1, y1 = REGIONS[AU_REGION[au]]

    def px(x, y):
        return (int((style.cx + x * style.scale) * size), int((style.cy + y * style.scale) * size))

    (c0, r0), (c1, r1) = px(x0, y0), px(x1, y1)
    inside = diff[r0:r1, c0:c1].sum()
    assert inside / diff.sum() >= 0.75, f"{au} drew mostly outside its region"


def test_unilateral_smile_moves_one_side_only():
    style = FaceStyle(noise=0.0, rotation=0.0, contempt_side=1)
    size = 112
    base = np.asarray(draw_face(set(), style, size=size), dtype=np.float32)
    one = np.asarray(draw_face({"AU12", "AU14"}, style, size=size, unilateral=True), np.float32)
    diff = np.abs(one - base).sum(axis=2) > 30
    mid = int(style.cx * size)
    left, right = diff[:, :mid].sum(), diff[:, mid:].sum()
    assert right > 2 * left


def _cfg(**kw) -> DemoFacesConfig:
    base = {"train": 16, "test": 8, "image_size": 56}
    base.update(kw)
    return DemoFacesConfig(**base)


def test_generate_writes_the_paper_layout(tmp_path):
    report = generate(_cfg(), tmp_path, progress=False)
    train = list(read_records(tmp_path / "DemoFaces_train.jsonl", check_id=True))
    test = list(read_records(tmp_path / "DemoFaces_test.jsonl", check_id=True))
    assert (len(train), len(test)) == (16, 8) == (report.counts["train"], report.counts["test"])
    assert {r.labels[0] for r in train} == set(EMOTIONS)  # balanced, 2 of each
    assert all(r.dataset == "DemoFaces" and r.question == DEFAULT_QUESTION for r in train)
    assert all(r.description == "" and len(r.labels) == 1 for r in train + test)
    for rec in train + test:
        with Image.open(rec.image_path(tmp_path)) as im:
            assert im.size == (56, 56) and im.mode == "RGB"
        assert nearest_emotion(rec.AUs) == rec.labels[0]
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers
    assert sorted(p.name for p in (tmp_path / "DemoFaces").iterdir()) == ["pool", "test", "train"]
    assert (tmp_path / "DemoFaces_pool.jsonl").read_text() == ""


def test_generation_is_deterministic_by_seed(tmp_path):
    generate(_cfg(), tmp_path / "a", progress=False)
    generate(_cfg(), tmp_path / "b", progress=False)
    generate(_cfg(seed=1), tmp_path / "c", progress=False)
    a = (tmp_path / "a" / "DemoFaces_train.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "DemoFaces_train.jsonl").read_bytes()
    assert a != (tmp_path / "c" / "DemoFaces_train.jsonl").read_bytes()
    for name in ("train/000000.png", "test/000005.png"):
        pa = np.asarray(Image.open(tmp_path / "a" / "DemoFaces" / name))
        pb = np.asarray(Image.open(tmp_path / "b" / "DemoFaces" / name))
        pc = np.asarray(Image.open(tmp_path / "c" / "DemoFaces" / name))
        assert np.array_equal(pa, pb) and not np.array_equal(pa, pc)


def test_splits_differ_and_are_stable(tmp_path):
    generate(_cfg(train=8, test=8, pool=8), tmp_path / "a", progress=False)
    generate(_cfg(train=3, test=8, pool=0), tmp_path / "b", progress=False)
    for i in range(8):
        faces = [
            np.asarray(Image.open(tmp_path / "a" / "DemoFaces" / f"{split}/{i:06d}.png"))
            for split in ("train", "test", "pool")
        ]
        assert not np.array_equal(faces[0], faces[1])
        assert not np.array_equal(faces[1], faces[2])
        same = np.asarray(Image.open(tmp_path / "b" / "DemoFaces" / f"test/{i:06d}.png"))
        assert np.array_equal(faces[1], same)  # test faces ignore the other splits' sizes
    assert len((tmp_path / "a" / "DemoFaces_pool.jsonl").read_text().splitlines()) == 8


def test_regeneration_replaces_old_images(tmp_path):
    generate(_cfg(train=16), tmp_path, progress=False)
    generate(_cfg(train=4, test=0, image_size=112), tmp_path, progress=False)
    images = sorted((tmp_path / "DemoFaces" / "train").iterdir())
    assert len(images) == 4 and not list((tmp_path / "DemoFaces" / "test").iterdir())
    with Image.open(images[0]) as im:
        assert im.size == (112, 112)
    assert (tmp_path / "DemoFaces_test.jsonl").read_text() == ""


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    dead = 999_999_999  # no such process
    (tmp_path / f".DemoFaces.tmp-{dead}" / "train").mkdir(parents=True)
    (tmp_path / f".DemoFaces_train.jsonl.tmp-{dead}").write_text("partial")
    generate(_cfg(train=2, test=1), tmp_path, progress=False)
    assert not list(tmp_path.glob(".*"))


def test_two_workers_give_the_same_dataset(tmp_path):
    generate(_cfg(train=70, test=0), tmp_path / "one", progress=False)
    generate(_cfg(train=70, test=0, workers=2), tmp_path / "two", progress=False)
    assert (tmp_path / "one" / "DemoFaces_train.jsonl").read_bytes() == (
        tmp_path / "two" / "DemoFaces_train.jsonl"
    ).read_bytes()


def test_contact_sheet(tmp_path):
    report = generate(_cfg(train=0, test=16), tmp_path, progress=False)
    path = contact_sheet(
        report.records["test"], tmp_path, tmp_path / "sheet.png", per_emotion=2, cell=100
    )
    with Image.open(path) as im:
        assert im.width == 8 * 100 and im.height > 2 * 100


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate(_cfg(image_size=8), tmp_path, progress=False)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    demo_faces.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_follows_the_stage_contract(tmp_path, capsys):
    profile = tmp_path / "profile.yaml"
    profile.write_text("demo_faces:\n  train: 3\n  test: 2\n  image_size: 56\n")
    result = tmp_path / "result.json"
    code = _run(
        [
            "demo-faces",
            "--config",
            str(profile),
            "--set",
            "demo_faces.train=8",
            "--output-dir",
            str(tmp_path / "data"),
            "--contact-sheet",
            str(tmp_path / "sheet.png"),
            "--result",
            str(result),
            "--no-mlflow",
            "--no-progress",
        ]
    )
    assert code == 0
    data = json.loads(result.read_text())
    assert data["stage"] == "data demo-faces" and data["status"] == "ok"
    assert data["metrics"]["train_faces"] == 8 and data["metrics"]["test_faces"] == 2
    assert Path(data["outputs"]["train_jsonl"]).is_file()
    assert Path(data["outputs"]["contact_sheet"]).is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == data


def test_cli_rejects_unknown_keys(tmp_path, capsys):
    profile = tmp_path / "profile.yaml"
    profile.write_text("demo_faces:\n  trian: 3\n")
    assert _run(["demo-faces", "--config", str(profile), "--no-mlflow"]) == 2
    assert "trian" in capsys.readouterr().err


def test_cli_logs_to_mlflow(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        "mlflow:\n  experiment: demo-test\n  artifact_root: mlartifacts\n"
        "demo_faces:\n  train: 8\n  test: 8\n"
    )
    result = tmp_path / "result.json"
    from facial_r1_core.tracking import configure_mlflow

    configure_mlflow({"mlflow": {"experiment": "demo-test", "artifact_root": "mlartifacts"}})
    with mlflow.start_run(run_name="pipeline") as parent:
        pass
    code = _run(
        [
            "demo-faces",
            "--config",
            str(profile),
            "--output-dir",
            str(tmp_path / "d"),
            "--result",
            str(result),
            "--parent-run-id",
            parent.info.run_id,
            "--no-progress",
        ]
    )
    assert code == 0
    run_id = json.loads(result.read_text())["mlflow_run_id"]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["train"] == "8"
    assert run.data.metrics["test_faces"] == 8
    assert run.data.tags["stage"] == "data demo-faces"
    names = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "demo_faces")]
    assert names == ["demo_faces/contact_sheet.png"]


@pytest.mark.parametrize("profile", ["tiny-cpu.yaml", "qwen2.5-vl-7b.yaml"])
def test_profiles_have_valid_data_sections(profile):
    from facial_r1_core.config import from_section, load_profile
    from facial_r1_data.seed import SeedConfig

    path = Path(__file__).resolve().parents[3] / "configs" / profile
    config = load_profile(path)
    demo = from_section(DemoFacesConfig, config["demo_faces"], name="demo_faces")
    seed = from_section(SeedConfig, config["seed_sft"], name="seed_sft")
    assert demo.image_size in (56, 112) and demo.train > 0 and demo.test > 0
    assert seed.teacher in ("template", "openai") and seed.count > 0
    assert seed.input == f"{demo.out_root}/{demo.dataset}_train.jsonl"
