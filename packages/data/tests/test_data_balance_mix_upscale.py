"""balance, mix and upscale: determinism, targets, reconciled counts, the learned-SR hook."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from facial_r1_core.schema import Record
from facial_r1_data.balance import balance, exact_plan, parse_class_targets, resolve_target
from facial_r1_data.mix import mix, parse_spec
from facial_r1_data.upscale import UpscalerUnavailableError, target_size, upscale
from facial_r1_data.validate import validate
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image


def write_records(path: Path, records: list[Record]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.to_json() + "\n" for r in records))
    return path


def skewed(tmp_path: Path) -> Path:
    counts = {"happiness": 40, "neutral": 20, "sadness": 10, "fear": 3}
    aus = {
        "happiness": ["AU6", "AU12"],
        "neutral": [],
        "sadness": ["AU1", "AU15"],
        "fear": ["AU1", "AU20"],
    }
    recs = [
        Record.create(dataset="D", image=f"{emo}/{i}.png", question="q", labels=[emo], AUs=aus[emo])
        for emo, n in counts.items()
        for i in range(n)
    ]
    return write_records(tmp_path / "D.jsonl", recs)


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_balance_emotion_exact_targets(tmp_path):
    src = skewed(tmp_path)
    result = balance(src, tmp_path / "B.jsonl", seed=3)
    # median of (40, 20, 10, 3) = 15; fear capped at 3 * max_factor 10 = 30 -> 15
    assert result["after"]["emotions"] == {
        "fear": 15,
        "happiness": 15,
        "neutral": 15,
        "sadness": 15,
    }
    rows = read(tmp_path / "B.jsonl")
    assert Counter(r["labels"][0] for r in rows) == Counter(result["after"]["emotions"])
    assert result["written"] == result["read"] - result["dropped"] + result["copies_added"]
    assert sum(1 for r in rows if r["meta_info"].get("copy")) == result["copies_added"]
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert validate(tmp_path / "B.jsonl", images=False)["ok"]  # copies are not duplicates
    again = balance(src, tmp_path / "B2.jsonl", seed=3)
    assert (tmp_path / "B2.jsonl").read_bytes() == (tmp_path / "B.jsonl").read_bytes()
    assert again["after"] == result["after"]
    other = balance(src, tmp_path / "B3.jsonl", seed=4)
    assert (tmp_path / "B3.jsonl").read_bytes() != (tmp_path / "B.jsonl").read_bytes()
    assert other["after"] == result["after"]


def test_balance_class_targets_and_cap(tmp_path):
    src = skewed(tmp_path)
    result = balance(
        src,
        tmp_path / "B.jsonl",
        target=20,
        class_targets=parse_class_targets(["happy=25,fear=100"]),
        max_factor=5,
    )
    assert result["after"]["emotions"] == {
        "happiness": 25,
        "neutral": 20,
        "sadness": 20,
        "fear": 15,
    }


def test_balance_by_au_raises_rare_aus(tmp_path):
    src = skewed(tmp_path)
    result = balance(src, tmp_path / "A.jsonl", by="au", seed=0)
    before, after = result["before"]["aus"], result["after"]["aus"]
    assert after["AU20"] > before["AU20"]  # rarest AU oversampled
    assert after["AU6"] < before["AU6"]  # most common AU undersampled
    assert result["written"] == result["read"] - result["dropped"] + result["copies_added"]
    both = balance(src, tmp_path / "C.jsonl", by="both", seed=0)
    assert both["after"]["emotions"]["fear"] > 3


def test_balance_cli(tmp_path, capsys):
    from facial_r1_core.cli import main

    src = skewed(tmp_path)
    assert (
        main(
            [
                "data",
                "balance",
                str(src),
                "--output",
                str(tmp_path / "B.jsonl"),
                "--target",
                "mean",
                "--no-plot",
            ]
        )
        == 0
    )
    assert "written" in capsys.readouterr().out
    assert (
        main(["data", "balance", str(src), "--out", str(tmp_path / "B.jsonl"), "--target", "most"])
        == 2
    )


@given(st.integers(1, 50), st.integers(0, 200), st.integers(0, 10))
def test_exact_plan_sums_to_target(count, target, seed):
    import numpy as np

    plan = exact_plan(count, target, np.random.default_rng(seed))
    assert int(plan.sum()) == target and plan.min() >= 0 and plan.max() - plan.min() <= 1


@given(st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 100), min_size=1))
def test_resolve_target_lies_within_counts(counts):
    counter = Counter(counts)
    for how in ("median", "mean", "min", "max"):
        value = resolve_target(counter, how)
        assert min(counts.values()) <= value <= max(counts.values())


def mix_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write_records(
        root / "A_train.jsonl",
        [
            Record.create(dataset="A", image=f"{i}.png", question="q", labels=["sad"])
            for i in range(50)
        ],
    )
    write_records(
        root / "B_train.jsonl",
        [
            Record.create(dataset="B", image=f"{i}.png", question="q", AUs=["AU4"])
            for i in range(20)
        ],
    )
    shared = Record.create(dataset="A", image="0.png", question="q", labels=["sad"])
    write_records(root / "C.jsonl", [shared])
    return root


def test_mix_specs(tmp_path):
    root = mix_root(tmp_path)
    out = root / "Mix_train.jsonl"
    result = mix(
        [
            (root / "A_train.jsonl", "random:7"),
            (root / "B_train.jsonl", "25%"),
            (root / "C.jsonl", "all"),
        ],
        out,
        seed=1,
    )
    rows = read(out)
    assert [i["selected"] for i in result["inputs"]] == [7, 5, 1]
    assert [i["read"] for i in result["inputs"]] == [50, 20, 1]
    assert Counter(r["dataset"] for r in rows) == {"A": 7, "B": 5} or Counter(
        r["dataset"] for r in rows
    ) == {"A": 8, "B": 5}
    assert result["read"] == result["written"] + result["quarantined"]
    again = mix(
        [
            (root / "A_train.jsonl", "random:7"),
            (root / "B_train.jsonl", "25%"),
            (root / "C.jsonl", "all"),
        ],
        root / "Mix2.jsonl",
        seed=1,
    )
    assert (root / "Mix2.jsonl").read_bytes() == out.read_bytes()
    assert again["written"] == result["written"]
    first = mix([(root / "A_train.jsonl", "first:3"), (root / "C.jsonl", "all")], root / "F.jsonl")
    assert [r["image"] for r in read(root / "F.jsonl")] == ["0.png", "1.png", "2.png"]
    assert first["quarantined_by_reason"] == {"duplicate_id": 1}


def test_mix_rejects_foreign_root_and_bad_spec(tmp_path):
    root = mix_root(tmp_path)
    with pytest.raises(ValueError, match="root"):
        mix([(root / "A_train.jsonl", "all")], tmp_path / "elsewhere" / "M.jsonl")
    with pytest.raises(ValueError, match="sampling spec"):
        parse_spec("some")


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(["all", "first:3", "random:0", "random:12", "0%", "50%", "100%"]),
    st.integers(0, 3),
)
def test_mix_counts_reconcile(tmp_path_factory, spec, seed):
    root = mix_root(tmp_path_factory.mktemp("mix"))
    result = mix([(root / "A_train.jsonl", spec)], root / "M.jsonl", seed=seed)
    kind, value = parse_spec(spec)
    want = {
        "all": 50,
        "first": min(50, value),
        "random": min(50, value),
        "percent": round(50 * value / 100),
    }[kind]
    assert result["written"] == want == len(read(root / "M.jsonl"))


def test_upscale_lanczos_and_link(tmp_path):
    root = tmp_path / "root"
    (root / "F").mkdir(parents=True)
    Image.new("L", (48, 48), 100).save(root / "F" / "small.png")
    Image.new("RGB", (400, 400), (1, 2, 3)).save(root / "F" / "big.png")
    (root / "F" / "bad.png").write_bytes(b"not a png")
    recs = [
        Record.create(dataset="F", image=n, question="q", labels=["sad"])
        for n in ("small.png", "big.png", "bad.png", "gone.png")
    ]
    write_records(root / "F.jsonl", recs)
    out = tmp_path / "up"
    report = upscale(root / "F.jsonl", out, size=336)
    with Image.open(out / "F" / "small.png") as img:
        assert img.size == (336, 336)
    with Image.open(out / "F" / "big.png") as img:
        assert img.size == (400, 400)
    assert report["upscaled"] == 1 and report["written"] == 2
    assert report["quarantined_by_reason"] == {"corrupt_image": 1, "missing_image": 1}
    rows = read(out / "F.jsonl")
    assert rows[0]["meta_info"]["upscale"] == {
        "from": [48, 48],
        "to": [336, 336],
        "method": "lanczos",
    }
    assert validate(out)["ok"]


def test_upscale_learned_needs_weights(tmp_path):
    root = tmp_path / "root"
    (root / "F").mkdir(parents=True)
    Image.new("L", (48, 48), 100).save(root / "F" / "small.png")
    write_records(
        root / "F.jsonl",
        [Record.create(dataset="F", image="small.png", question="q", labels=["sad"])],
    )
    with pytest.raises(UpscalerUnavailableError, match="weights not found"):
        upscale(
            root / "F.jsonl", tmp_path / "up", method="learned", weights=tmp_path / "missing.pt"
        )
    assert not (tmp_path / "up").exists()  # nothing written


def test_upscale_learned_torchscript_hook(tmp_path):
    import torch

    class Double(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")

    weights = tmp_path / "sr.pt"
    torch.jit.script(Double()).save(str(weights))
    root = tmp_path / "root"
    (root / "F").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(root / "F" / "s.png")
    write_records(
        root / "F.jsonl", [Record.create(dataset="F", image="s.png", question="q", labels=["sad"])]
    )
    report = upscale(root / "F.jsonl", tmp_path / "up", size=32, method="learned", weights=weights)
    assert report["method"] == "learned:sr.pt" and report["upscaled"] == 1
    with Image.open(tmp_path / "up" / "F" / "s.png") as img:
        assert img.size == (32, 32) and img.getpixel((5, 5)) == (200, 10, 10)


@given(st.integers(1, 500), st.integers(1, 500), st.integers(1, 400))
def test_target_size_shorter_side(w, h, size):
    tw, th = target_size(w, h, size)
    assert min(tw, th) == size or (w != h and abs(min(tw, th) - size) <= 1)
