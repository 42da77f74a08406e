"""Builders of tiny dataset distributions in each official layout, with malformed variants.

Each builder writes files under a folder and returns what a correct conversion must produce:
``expected`` maps output image path -> (labels, AUs) and ``rejects`` is the sorted list of
quarantine reasons. Images are 8x8 so the tests stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: int = 8, value: int = 128, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3), value, dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)
    Image.fromarray(arr).save(path, fmt or ("PNG" if path.suffix == ".png" else "JPEG"))
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" + bytes(range(40)))
    return path


def pixels(value: int = 100, n: int = 2304) -> str:
    return " ".join(str((value + i) % 256) for i in range(n))


def build_fer2013(root: Path) -> dict:
    rows = [
        "emotion,pixels,Usage",
        f"0,{pixels(1)},Training",  # row 0 ok angry -> anger
        f"3,{pixels(2)},PublicTest",  # row 1 ok happy (val)
        f"6,{pixels(3)},PrivateTest",  # row 2 ok neutral (test)
        f"5,{pixels(4, 2000)},Training",  # row 3 bad pixel count
        f"7,{pixels(5)},Training",  # row 4 unknown label code
        f"2,{pixels(6)}",  # row 5 truncated (no Usage)
        "4,1 2 x,Training",  # row 6 bad pixels (non-integer, wrong count)
        f"1,{' '.join(['300'] * 2304)},Training",  # row 7 out-of-range values
        f"4,{pixels(7)},Training",  # row 8 ok sad
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "fer2013.csv").write_text("\n".join(rows) + "\n")
    return {
        "expected": {
            "Training/00000.png": (["anger"], []),
            "PublicTest/00001.png": (["happiness"], []),
            "PrivateTest/00002.png": (["neutral"], []),
            "Training/00008.png": (["sadness"], []),
        },
        "rejects": sorted(
            ["bad_pixels", "unknown_label", "truncated_row", "bad_pixels", "bad_pixels"]
        ),
    }


def build_rafdb(root: Path) -> dict:
    img = root / "Image" / "aligned"
    lines = [
        "train_00001.jpg 5",  # sadness
        "train_00002.jpg 1",  # surprise
        "train_00003.jpg 9",  # unknown code
        "train_00004.jpg",  # truncated
        "test_0001.jpg 4",  # happiness
        "test_0002.jpg 7",  # neutral, image missing
        "train_00005.jpg 6",  # anger, corrupt image
        "../evil.jpg 3",  # bad prefix -> bad_value (not train_/test_)
        "train_x/../../evil.jpg 2",  # unsafe path
    ]
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for name in ("train_00001", "train_00002", "train_00003", "train_00004", "test_0001"):
        write_image(img / f"{name}_aligned.jpg")
    write_corrupt(img / "train_00005_aligned.jpg")
    return {
        "expected": {
            "aligned/train_00001_aligned.jpg": (["sadness"], []),
            "aligned/train_00002_aligned.jpg": (["surprise"], []),
            "aligned/test_0001_aligned.jpg": (["happiness"], []),
        },
        "rejects": sorted(
            [
                "unknown_label",
                "truncated_row",
                "missing_image",
                "corrupt_image",
                "bad_value",
                "unsafe_path",
            ]
        ),
    }


AFFECTNET_HEADER = (
    "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
    "expression,valence,arousal"
)


def build_affectnet_csv(root: Path) -> dict:
    images = root / "Manually_Annotated_Images"
    lm = '"1.0;2.0;3.0"'
    train = [
        AFFECTNET_HEADER,
        f"1/a.jpg,2,2,4,4,{lm},1,0.5,0.2",  # happy
        f"1/b.jpg,0,0,8,8,{lm},7,-0.1,0.3",  # contempt
        f"2/c.jpg,0,0,8,8,{lm},8,0,0",  # none -> excluded
        f"2/d.jpg,0,0,8,8,{lm},9,0,0",  # uncertain -> excluded
        f"2/e.jpg,0,0,8,8,{lm},10,0,0",  # no-face -> excluded
        f"2/f.jpg,0,0,8,8,{lm},12,0,0",  # unknown code
        "2/g.jpg,0,0,8",  # truncated
        f"../h.jpg,0,0,8,8,{lm},0,0,0",  # unsafe path
        f"3/i.jpg,0,0,8,8,{lm},6,0,0",  # anger, missing image
        f"3/j.jpg,50,50,4,4,{lm},4,0,0",  # fear, box outside the 8x8 image (crop only)
    ]
    test = [AFFECTNET_HEADER, f"4/k.jpg,0,0,8,8,{lm},0,0.0,0.0"]  # neutral
    root.mkdir(parents=True, exist_ok=True)
    (root / "training.csv").write_text("\n".join(train) + "\n")
    (root / "validation.csv").write_text("\n".join(test) + "\n")
    for name in ("1/a.jpg", "1/b.jpg", "2/c.jpg", "3/j.jpg", "4/k.jpg"):
        write_image(images / name)
    return {
        "train_expected": {
            "1/a.jpg": (["happiness"], []),
            "1/b.jpg": (["contempt"], []),
            "3/j.jpg": (["fear"], []),
        },
        "train_rejects": sorted(
            ["excluded_label"] * 3
            + ["unknown_label", "truncated_row", "unsafe_path", "missing_image"]
        ),
        "test_expected": {"4/k.jpg": (["neutral"], [])},
    }


def build_affectnet_folder(root: Path) -> dict:
    for part, items in (
        ("train_set", {"0": "1", "1": "6", "2": "9", "3": "x"}),
        ("val_set", {"0": "3"}),
    ):
        ann = root / part / "annotations"
        ann.mkdir(parents=True, exist_ok=True)
        for stem, code in items.items():
            np.save(ann / f"{stem}_exp.npy", np.array(code))
            np.save(ann / f"{stem}_val.npy", np.array("0.25"))
            np.save(ann / f"{stem}_aro.npy", np.array("-0.5"))
            write_image(root / part / "images" / f"{stem}.jpg")
    (root / "train_set" / "annotations" / "4_exp.npy").write_bytes(b"garbage")
    return {
        "expected": {
            "train_set/0.jpg": (["happiness"], []),
            "train_set/1.jpg": (["anger"], []),
            "val_set/0.jpg": (["surprise"], []),
        },
        "rejects": sorted(["excluded_label", "unknown_label", "bad_value"]),
    }


def build_rafau(root: Path) -> dict:
    lines = [
        "0001.jpg 1+2+25+26",
        "0002.jpg 4+L12+R14",
        "0003.jpg null",  # annotated, no AU active
        "0004.jpg 1+smile",  # bad code
        "0005.jpg",  # truncated
        "0006.jpg 6+12",  # missing image
        "../0007.jpg 4",  # unsafe
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "RAFAU_label.txt").write_text("\n".join(lines) + "\n")
    for n in ("0001", "0002", "0003", "0004", "0005"):
        write_image(root / "aligned" / f"{n}_aligned.jpg")
    return {
        "expected": {
            "0001_aligned.jpg": ([], ["AU1", "AU2", "AU25", "AU26"]),
            "0002_aligned.jpg": ([], ["AU4", "AU12", "AU14"]),
            "0003_aligned.jpg": ([], []),
        },
        "rejects": sorted(["unknown_label", "truncated_row", "missing_image", "unsafe_path"]),
    }


DISFA_AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)


def build_disfa(root: Path, frames_per_subject: int = 6) -> dict:
    """Two subjects; SN001 frame 3 has a bad intensity, SN002's au26 file is one line short."""
    labels = root / "ActionUnit_Labels"
    expected = {}
    rejects = []
    for subject in ("SN001", "SN002"):
        (labels / subject).mkdir(parents=True, exist_ok=True)
        for au in DISFA_AUS:
            rows = []
            n = frames_per_subject - 1 if (subject == "SN002" and au == 26) else frames_per_subject
            for frame in range(1, n + 1):
                value = (frame + au) % 6
                if subject == "SN001" and frame == 3 and au == 4:
                    rows.append(f"{frame},7")
                else:
                    rows.append(f"{frame},{value}")
            (labels / subject / f"{subject}_au{au}.txt").write_text("\n".join(rows) + "\n")
        for frame in range(1, frames_per_subject + 1):
            if subject == "SN001" and frame == 3:
                rejects.append("bad_value")
                continue
            if subject == "SN002" and frame == frames_per_subject:
                rejects.append("incomplete_labels")
                continue
            if subject == "SN001" and frame == 5:
                rejects.append("missing_image")  # no frame file written
                continue
            write_image(root / "frames" / subject / f"{frame}.jpg")
            aus = [f"AU{au}" for au in DISFA_AUS if (frame + au) % 6 >= 2]
            expected[f"{subject}/{frame:05d}.jpg"] = ([], aus)
    return {"expected": expected, "rejects": sorted(rejects)}


def build_bp4d(root: Path) -> dict:
    occ = root / "AUCoding" / "AU_OCC"
    occ.mkdir(parents=True, exist_ok=True)
    header = "0,1,2,4,6,12"
    rows = [
        "1,1,0,0,1,1",  # AU1 AU6 AU12
        "2,0,9,1,0,0",  # AU4, AU2 unknown
        "3,9,9,9,9,9",  # all unknown
        "4,1,0,3,0,0",  # bad code
        "5,1,0",  # truncated
        "6,0,0,0,0,0",  # none active
        "7,1,1,1,1,1",  # missing image
    ]
    (occ / "F001_T1.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    (occ / "M002_T2.csv").write_text(header + "\n1,0,0,0,0,1\n")
    for frame in (1, 2, 3, 4, 5, 6):
        write_image(root / "frames" / "F001" / "T1" / f"{frame:04d}.jpg")
    write_image(root / "frames" / "M002" / "T2" / "0001.jpg")
    return {
        "expected": {
            "F001/T1/0001.jpg": ([], ["AU1", "AU6", "AU12"]),
            "F001/T1/0002.jpg": ([], ["AU4"]),
            "F001/T1/0006.jpg": ([], []),
            "M002/T2/0001.jpg": ([], ["AU12"]),
        },
        "rejects": sorted(["all_aus_unknown", "bad_value", "truncated_row", "missing_image"]),
    }


def _conv(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"{question}\n<image>"}, {"from": "gpt", "value": answer}]


def build_faba(root: Path) -> dict:
    base = root / "FABAInstruct"
    for part in ("train", "eval"):
        (base / part).mkdir(parents=True, exist_ok=True)

    def img(part: str, name: str) -> str:
        return f"FABAInstruct/{part}/images/AffectNet/{name}.jpg"

    au_train = [
        {
            "source": "AffectNet",
            "image": img("train", "a"),
            "id": "a",
            "conversations": _conv("What AUs?", "1. AU4 - Brow Lowerer. 2. AU9 - Nose Wrinkler."),
        },
        {
            "source": "AffectNet",
            "image": img("train", "b"),
            "id": "b",
            "conversations": _conv("What AUs?", "AU6 and AU12 are visible."),
            "label": "6, 12",
        },
        {
            "source": "AffectNet",
            "image": img("train", "c"),
            "id": "c",
            "conversations": _conv("What AUs?", "AU99x"),
            "label": "6, smile",
        },
        {"source": "AffectNet", "id": "no-image"},
    ]
    emo_train = [
        {
            "source": "AffectNet",
            "image": img("train", "a"),
            "id": "a",
            "conversations": _conv("What emotion?", "Looks disgusted."),
            "label": "Disgust",
        },
        {
            "source": "AffectNet",
            "image": img("train", "d"),
            "id": "d",
            "conversations": _conv("What emotion?", "A calm face."),
        },  # no label, no AU entry
        {
            "source": "AffectNet",
            "image": img("train", "e"),
            "id": "e",
            "conversations": _conv("What emotion?", "Happy."),
            "label": 0,
        },  # EmoLA index
        {
            "source": "AffectNet",
            "image": "FABAInstruct/train/images/../../x.jpg",
            "id": "x",
            "conversations": _conv("What emotion?", "?"),
            "label": "Fear",
        },
    ]
    emo_eval = [
        {
            "source": "AffectNet",
            "image": img("eval", "f"),
            "id": "f",
            "conversations": _conv("What emotion?", "Sad."),
            "label": "Sadness",
        },
    ]
    (base / "train" / "train_au_anno.json").write_text(json.dumps(au_train))
    (base / "train" / "train_emotion_anno.json").write_text(json.dumps(emo_train))
    (base / "eval" / "eval_emotion_anno.json").write_text(json.dumps(emo_eval))
    for part, name in (
        ("train", "a"),
        ("train", "b"),
        ("train", "c"),
        ("train", "d"),
        ("eval", "f"),
    ):
        write_image(base / part / "images" / "AffectNet" / f"{name}.jpg")
    # train/e.jpg is missing on disk
    return {
        "train_expected": {
            "train/images/AffectNet/a.jpg": (["disgust"], ["AU4", "AU9"]),
            "train/images/AffectNet/b.jpg": ([], ["AU6", "AU12"]),
        },
        "train_rejects": sorted(
            ["unknown_label", "schema_error", "missing_label", "missing_image", "unsafe_path"]
        ),
        "test_expected": {"eval/images/AffectNet/f.jpg": (["sadness"], [])},
    }


def build_fea20k(root: Path, images_root: Path) -> dict:
    from facial_r1_core.schema import Record

    root.mkdir(parents=True, exist_ok=True)
    good = [
        Record.create(dataset="RAF-DB", image="aligned/x1.jpg", question="q", labels=["happy"]),
        Record.create(dataset="DISFA", image="SN001/00001.jpg", question="q", AUs=["AU1"]),
        Record.create(dataset="RAF-DB", image="aligned/missing.jpg", question="q", labels=["sad"]),
    ]
    lines = [r.to_json() for r in good]
    lines.append(json.dumps({"dataset": "RAF-DB", "image": "../x.jpg", "question": "q"}))
    lines.append(
        json.dumps({"dataset": "RAF-DB", "image": "y.jpg", "question": "q", "labels": ["bored"]})
    )
    lines.append("{not json")
    lines.append(json.dumps({"image": "z.jpg", "question": "q"}))
    lines.append(good[0].to_json())  # duplicate id
    (root / "FEA-20K_train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "FEA-20K_test.jsonl").write_text(
        Record.create(
            dataset="FER2013", image="PrivateTest/00002.png", question="q", labels=["neutral"]
        ).to_json()
        + "\n"
    )
    write_image(images_root / "RAF-DB" / "aligned" / "x1.jpg")
    write_image(images_root / "DISFA" / "SN001" / "00001.jpg")
    write_image(images_root / "FER2013" / "PrivateTest" / "00002.png")
    return {
        "train_expected": {
            "RAF-DB/aligned/x1.jpg": (["happiness"], []),
            "DISFA/SN001/00001.jpg": ([], ["AU1"]),
        },
        "train_rejects": sorted(
            [
                "missing_image",
                "unsafe_path",
                "unknown_label",
                "invalid_json",
                "schema_error",
                "duplicate_id",
            ]
        ),
    }


def build_generic(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rows = [
        "file,emotion,aus,split",
        "img/1.png,0,AU1|AU2,train",
        "img/2.png,happy,,train",
        "img/3.png,,12+6,test",
        "img/4.png,bored,,train",  # unknown
        "img/5.png,,,train",  # missing label
        "../6.png,sad,,train",  # unsafe
        "img/7.png,sad",  # truncated
    ]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    for n in (1, 2, 3, 4, 5):
        write_image(root / "img" / f"{n}.png")
    return {
        "expected": {
            "img/1.png": (["anger"], ["AU1", "AU2"]),
            "img/2.png": (["happiness"], []),
            "img/3.png": ([], ["AU6", "AU12"]),
        },
        "rejects": sorted(["unknown_label", "missing_label", "unsafe_path", "truncated_row"]),
    }
