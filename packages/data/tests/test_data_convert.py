"""Converters: every official layout, every output record, every quarantine reason, counts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from facial_r1_core.schema import Record, record_id
from facial_r1_data.convert import convert
from facial_r1_data.converters import LayoutError
from PIL import Image


def _load_builders():
    name = "data_fixture_builders"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fx = _load_builders()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_conversion(report: dict, expected: dict, rejects: list[str], out: Path, folder: str):
    """Every output record and every quarantine line, and the counts, against the fixture."""
    records = read_jsonl(Path(report["jsonl"]))
    quarantine = read_jsonl(Path(report["quarantine_file"]))
    got = {
        (r["image"] if r["dataset"] == folder else f"{r['dataset']}/{r['image']}"): (
            r["labels"],
            r["AUs"],
        )
        for r in records
    }
    assert got == expected
    assert sorted(q["reason"] for q in quarantine) == rejects
    for q in quarantine:
        assert q["detail"] and q["source"], q
    assert report["read"] == report["written"] + report["quarantined"]
    assert report["reconciles"] is True
    assert report["written"] == len(records)
    assert report["quarantined"] == len(quarantine)
    assert sum(report["quarantined_by_reason"].values()) == report["quarantined"]
    for r in records:
        rec = Record.from_dict(r, check_id=True)
        assert rec.id == record_id(rec.dataset, rec.image, rec.question)
        path = rec.image_path(out)
        assert path.is_file(), path
        with Image.open(path) as img:
            img.load()
    labels = {}
    for r in records:
        for label in r["labels"]:
            labels[label] = labels.get(label, 0) + 1
    assert report["labels"] == labels
    saved = json.loads(Path(report["report_file"]).read_text())
    assert saved["read"] == report["read"] and saved["written"] == report["written"]
    return records, quarantine


def test_fer2013_all_splits(tmp_path):
    exp = fx.build_fer2013(tmp_path / "src")
    out = tmp_path / "out"
    report = convert("fer2013", tmp_path / "src", out, "all", no_progress=True)
    records, quarantine = check_conversion(report, exp["expected"], exp["rejects"], out, "FER2013")
    assert (out / "FER2013.jsonl").is_file()
    first = next(r for r in records if r["image"] == "Training/00000.png")
    assert first["meta_info"]["emotion_raw"] == 0 and first["meta_info"]["emotion_name"] == "angry"
    assert first["meta_info"]["usage"] == "Training"
    with Image.open(out / "FER2013" / "Training" / "00000.png") as img:
        assert img.size == (48, 48) and img.mode == "L"
        assert img.getpixel((0, 0)) == 1 and img.getpixel((1, 0)) == 2
    by_line = {q["source"]["line"]: q["reason"] for q in quarantine}
    assert by_line == {
        5: "bad_pixels",
        6: "unknown_label",
        7: "truncated_row",
        8: "bad_pixels",
        9: "bad_pixels",
    }


def test_fer2013_split_and_usage_map(tmp_path):
    fx.build_fer2013(tmp_path / "src")
    out = tmp_path / "out"
    report = convert(
        "fer2013", tmp_path / "src", out, "test", usage_map="PublicTest=test", no_progress=True
    )
    records = read_jsonl(out / "FER2013_test.jsonl")
    assert sorted(r["image"] for r in records) == ["PrivateTest/00002.png", "PublicTest/00001.png"]
    # the truncated row has no Usage: quarantined in every split's run, never lost
    assert report["quarantined_by_reason"] == {"truncated_row": 1}
    assert report["read"] == report["written"] + report["quarantined"] == 3
    assert report["converter"]["skipped_other_splits"] == {"train": 6}


def test_fer2013_wrong_header_stops(tmp_path):
    (tmp_path / "fer2013.csv").write_text("label,image\n1,2\n")
    with pytest.raises(LayoutError, match="emotion,pixels,Usage"):
        convert("fer2013", tmp_path, tmp_path / "out", no_progress=True)


def test_rafdb(tmp_path):
    exp = fx.build_rafdb(tmp_path / "src")
    out = tmp_path / "out"
    report = convert("rafdb", tmp_path / "src", out, "all", no_progress=True)
    records, quarantine = check_conversion(report, exp["expected"], exp["rejects"], out, "RAF-DB")
    rec = next(r for r in records if r["image"] == "aligned/train_00001_aligned.jpg")
    assert rec["meta_info"]["label_raw"] == 5 and rec["meta_info"]["split"] == "train"
    assert rec["meta_info"]["source_image"] == "train_00001.jpg"
    reasons = {q["source"]["line"]: q["reason"] for q in quarantine}
    assert reasons == {
        3: "unknown_label",
        4: "truncated_row",
        6: "missing_image",
        7: "corrupt_image",
        8: "bad_value",
        9: "unsafe_path",
    }
    # the linked image is the source file (hard link or copy), byte for byte
    src = tmp_path / "src" / "Image" / "aligned" / "train_00001_aligned.jpg"
    assert (out / "RAF-DB" / "aligned" / "train_00001_aligned.jpg").read_bytes() == src.read_bytes()


def test_rafdb_test_split_and_missing_images_dir(tmp_path):
    fx.build_rafdb(tmp_path / "src")
    report = convert("rafdb", tmp_path / "src", tmp_path / "out", "test", no_progress=True)
    assert report["written"] == 1 and report["quarantined_by_reason"] == {
        "bad_value": 1,
        "missing_image": 1,
    }
    with pytest.raises(LayoutError, match="Image/original"):
        convert(
            "rafdb", tmp_path / "src", tmp_path / "o2", rafdb_images="original", no_progress=True
        )


def test_layout_error_names_what_and_where(tmp_path):
    with pytest.raises(LayoutError) as err:
        convert("rafdb", tmp_path, tmp_path / "out", no_progress=True)
    assert "list_patition_label.txt" in str(err.value) and str(tmp_path) in str(err.value)


def test_affectnet_csv(tmp_path):
    exp = fx.build_affectnet_csv(tmp_path / "src")
    out = tmp_path / "out"
    report = convert("affectnet", tmp_path / "src", out, "train", no_progress=True)
    records, quarantine = check_conversion(
        report, exp["train_expected"], exp["train_rejects"], out, "AffectNet"
    )
    excluded = sorted(
        q["detail"].split(" = ")[1].split(":")[0]
        for q in quarantine
        if q["reason"] == "excluded_label"
    )
    assert excluded == ["no-face", "none", "uncertain"]
    assert report["converter"]["excluded_by_code"] == {"none": 1, "uncertain": 1, "no-face": 1}
    rec = next(r for r in records if r["image"] == "1/a.jpg")
    assert rec["meta_info"]["valence"] == 0.5 and rec["meta_info"]["face_box"] == [2, 2, 4, 4]
    assert "facial_landmarks" not in rec["meta_info"]
    assert (out / "AffectNet_train.jsonl").is_file()
    test_report = convert("affectnet", tmp_path / "src", out, "test", no_progress=True)
    check_conversion(test_report, exp["test_expected"], [], out, "AffectNet")


def test_affectnet_crop_faces(tmp_path):
    fx.build_affectnet_csv(tmp_path / "src")
    out = tmp_path / "out"
    report = convert("affectnet", tmp_path / "src", out, "train", crop_faces=True, no_progress=True)
    assert report["quarantined_by_reason"]["bad_face_box"] == 1  # 3/j.jpg box off the image
    with Image.open(out / "AffectNet" / "1" / "a.jpg") as img:
        assert img.size == (4, 4)
    assert report["read"] == report["written"] + report["quarantined"]


def test_affectnet_labels_only_needs_no_images(tmp_path):
    fx.build_affectnet_csv(tmp_path / "src")
    out = tmp_path / "out"
    report = convert("affectnet", tmp_path / "src", out, "train", images="none", no_progress=True)
    assert report["written"] == 4  # 3/i.jpg is not checked for existence in labels-only mode
    assert not (out / "AffectNet").exists()


def test_affectnet_folder_release(tmp_path):
    exp = fx.build_affectnet_folder(tmp_path / "src")
    out = tmp_path / "out"
    report = convert("affectnet", tmp_path / "src", out, "all", no_progress=True)
    records, _ = check_conversion(report, exp["expected"], exp["rejects"], out, "AffectNet")
    assert report["converter"]["release"] == "folder"
    assert records[0]["meta_info"]["valence"] == 0.25 and records[0]["meta_info"]["arousal"] == -0.5


def test_rafau(tmp_path):
    exp = fx.build_rafau(tmp_path / "src")
    out = tmp_path / "out"
    report = convert("rafau", tmp_path / "src", out, "all", no_progress=True)
    records, _ = check_conversion(report, exp["expected"], exp["rejects"], out, "RAF-AU")
    rec = next(r for r in records if r["image"] == "0002_aligned.jpg")
    assert rec["meta_info"]["au_qualifiers"] == {"AU12": "L", "AU14": "R"}
    train = convert("rafau", tmp_path / "src", out, "train", no_progress=True)
    test = convert("rafau", tmp_path / "src", out, "test", no_progress=True)
    assert train["read"] + test["read"] == report["read"]


def test_disfa(tmp_path):
    exp = fx.build_disfa(tmp_path / "src")
    out = tmp_path / "out"
    report = convert("disfa", tmp_path / "src", out, "all", no_progress=True)
    records, _ = check_conversion(report, exp["expected"], exp["rejects"], out, "DISFA")
    rec = next(r for r in records if r["image"] == "SN001/00001.jpg")
    assert rec["meta_info"]["au_intensity"]["AU1"] == 2 and rec["meta_info"]["au_threshold"] == 2
    assert rec["meta_info"]["aus_annotated"][0] == "AU1"


def test_disfa_threshold_stride_and_subject_split(tmp_path):
    fx.build_disfa(tmp_path / "src")
    out = tmp_path / "out"
    strict = convert("disfa", tmp_path / "src", out, "all", au_threshold=5, no_progress=True)
    for r in read_jsonl(Path(strict["jsonl"])):
        assert all(v == 5 for k, v in r["meta_info"]["au_intensity"].items() if k in r["AUs"])
    strided = convert("disfa", tmp_path / "src", out, "all", frame_stride=2, no_progress=True)
    assert strided["read"] == 6 and strided["converter"]["frames_skipped_by_stride"] == 6
    with pytest.raises(LayoutError, match="--test-subjects"):
        convert("disfa", tmp_path / "src", out, "test", no_progress=True)
    test = convert("disfa", tmp_path / "src", out, "test", test_subjects="SN002", no_progress=True)
    assert {r["meta_info"]["subject"] for r in read_jsonl(Path(test["jsonl"]))} == {"SN002"}


def test_disfa_wrong_frame_pattern_stops(tmp_path):
    fx.build_disfa(tmp_path / "src")
    with pytest.raises(LayoutError, match="frame-pattern"):
        convert(
            "disfa",
            tmp_path / "src",
            tmp_path / "out",
            frame_pattern="{subject}/{frame:05d}.png",
            no_progress=True,
        )


def test_bp4d(tmp_path):
    exp = fx.build_bp4d(tmp_path / "src")
    out = tmp_path / "out"
    report = convert("bp4d", tmp_path / "src", out, "all", no_progress=True)
    records, _ = check_conversion(report, exp["expected"], exp["rejects"], out, "BP4D")
    rec = next(r for r in records if r["image"] == "F001/T1/0002.jpg")
    assert rec["meta_info"]["aus_unknown"] == ["AU2"]
    assert "AU2" not in rec["meta_info"]["aus_annotated"]
    assert report["converter"]["aus_unknown_frames"] == {"AU2": 1}


def test_faba(tmp_path):
    exp = fx.build_faba(tmp_path / "src")
    out = tmp_path / "out"
    report = convert("faba", tmp_path / "src", out, "train", no_progress=True)
    records, _ = check_conversion(
        report, exp["train_expected"], exp["train_rejects"], out, "FABA-Instruct"
    )
    a = next(r for r in records if r["image"].endswith("a.jpg"))
    assert a["meta_info"]["aus_from"] == "answer text"
    assert a["meta_info"]["faba_emotion_question"] == "What emotion?"
    assert a["description"] == ""
    test = convert("faba", tmp_path / "src", out, "test", no_progress=True)
    check_conversion(test, exp["test_expected"], [], out, "FABA-Instruct")


def test_fea20k_links_and_reports_missing(tmp_path):
    exp = fx.build_fea20k(tmp_path / "ann", tmp_path / "images")
    out = tmp_path / "out"
    report = convert(
        "fea20k", tmp_path / "ann", out, "train", images_root=tmp_path / "images", no_progress=True
    )
    _, quarantine = check_conversion(
        report, exp["train_expected"], exp["train_rejects"], out, "FEA-20K"
    )
    missing = next(q for q in quarantine if q["reason"] == "missing_image")
    assert "aligned/missing.jpg" in missing["detail"]
    assert (out / "FEA-20K_train.jsonl").is_file()
    assert report["converter"]["files"] == ["FEA-20K_train.jsonl"]


def test_generic_manifest(tmp_path):
    exp = fx.build_generic(tmp_path / "src")
    out = tmp_path / "out"
    report = convert(
        "generic",
        tmp_path / "src",
        out,
        "all",
        name="MyFaces",
        manifest=tmp_path / "src" / "manifest.csv",
        image_col="file",
        labels_col="emotion",
        label_map="0=anger",
        split_col="split",
        no_progress=True,
    )
    check_conversion(report, exp["expected"], exp["rejects"], out, "MyFaces")
    assert (out / "MyFaces.jsonl").is_file()
    with pytest.raises(LayoutError, match="image column"):
        convert(
            "generic",
            tmp_path / "src",
            out,
            name="X",
            manifest=tmp_path / "src" / "manifest.csv",
            no_progress=True,
        )


def test_generic_jsonl_manifest(tmp_path):
    fx.write_image(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "a.png", "label": ["Happy"], "aus": ["AU6", "AU12"]})
        + "\n"
        + "[1, 2]\n"
    )
    report = convert(
        "generic",
        tmp_path,
        tmp_path / "out",
        name="J",
        manifest=tmp_path / "m.jsonl",
        no_progress=True,
    )
    assert report["written"] == 1 and report["quarantined_by_reason"] == {"invalid_json": 1}


def test_cli_convert_and_exit_codes(tmp_path, capsys):
    from facial_r1_core.cli import main

    fx.build_rafdb(tmp_path / "src")
    code = main(
        [
            "data",
            "convert",
            "--dataset",
            "rafdb",
            str(tmp_path / "src"),
            "--output-dir",
            str(tmp_path / "out"),
            "--split",
            "train",
            "--no-progress",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "read 7, written 2, quarantined 5" in text
    code = main(
        [
            "data",
            "convert",
            "--dataset",
            "bp4d",
            "--source",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "AU_OCC" in capsys.readouterr().err


def test_rerun_is_idempotent(tmp_path):
    fx.build_rafdb(tmp_path / "src")
    out = tmp_path / "out"
    first = convert("rafdb", tmp_path / "src", out, no_progress=True)
    body = (out / "RAF-DB.jsonl").read_bytes()
    second = convert("rafdb", tmp_path / "src", out, no_progress=True)
    assert (out / "RAF-DB.jsonl").read_bytes() == body
    assert first["written"] == second["written"]


@pytest.mark.parametrize("mode", ["copy", "symlink", "link"])
def test_image_placement_modes(tmp_path, mode):
    fx.build_rafdb(tmp_path / "src")
    out = tmp_path / "out"
    convert("rafdb", tmp_path / "src", out, "test", images=mode, no_progress=True)
    dest = out / "RAF-DB" / "aligned" / "test_0001_aligned.jpg"
    src = tmp_path / "src" / "Image" / "aligned" / "test_0001_aligned.jpg"
    assert dest.read_bytes() == src.read_bytes()
    assert dest.is_symlink() == (mode == "symlink")
    assert dest.samefile(src) == (mode != "copy")
