"""SFT stage: data validation with reasons, a tiny training run (resume after a killed run:
test_training_faults.py)."""

from __future__ import annotations

import json

import pytest
from facial_r1_core.cli import main as cli_main
from facial_r1_training import models
from facial_r1_training.data import SFTCollator, load_records, sft_rows, to_dataset
from facial_r1_training.testing import write_profile, write_toy_dataset

FAST = [
    "--set",
    "sft.per_device_train_batch_size=4",
    "--set",
    "sft.logging_steps=1",
    "--set",
    "sft.warmup_steps=0",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    models.build_tiny(root / "tiny")
    write_toy_dataset(root / "data", 24, split="train")
    profile = write_profile(
        root / "profile.yaml",
        {
            "profile": {"name": "test-sft"},
            "run": {"seed": 0, "torch_threads": 1},
            "mlflow": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "sft-tests",
                "artifact_root": str(root / "art"),
            },
            "model": {"path": "tiny"},
            "sft": {
                "train_file": ["data/Toy_train.jsonl"],
                "output_dir": "runs/sft",
                "max_steps": 4,
                "save_steps": 100,
                "learning_rate": 3e-3,
                "max_length": 512,
            },
        },
    )
    return root, profile


@pytest.fixture
def env(home, monkeypatch):
    root, _ = home
    monkeypatch.setenv("FACIAL_R1_HOME", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


def write_bad_file(root):
    """Good records plus one of each kind of bad input."""
    path = write_toy_dataset(root, 6, dataset="Mixed")
    lines = path.read_text().splitlines()
    empty = json.loads(lines[1])
    empty["description"] = ""
    missing = json.loads(lines[2])
    missing["image"] = "nope.png"
    broken = json.loads(lines[3])
    (root / "Mixed" / broken["image"]).write_bytes(b"not a png at all")
    lines[1], lines[2], lines[3] = json.dumps(empty), json.dumps(missing), json.dumps(broken)
    lines.append("{not json")
    lines.append(json.dumps({"dataset": "Mixed", "image": "x.png"}))  # no question
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_records_rejected_with_reasons(tmp_path):
    path = write_bad_file(tmp_path)
    _, report = load_records([path], require_description=True, progress=False)
    assert report.read == 8 and report.kept == 3 and report.rejected == 5
    assert report.read == report.kept + report.rejected
    assert report.by_code() == {
        "empty_description": 1,
        "missing_image": 1,
        "bad_image": 1,
        "schema": 2,
    }
    reasons = {r.code: r.reason for r in report.rejections}
    assert "nope.png" in reasons["missing_image"]
    assert "does not decode" in reasons["bad_image"]
    assert all(r.line > 0 and r.path == str(path) for r in report.rejections)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_records([tmp_path / "absent.jsonl"])


def test_rows_and_hinting_collator(tmp_path):
    path = write_toy_dataset(tmp_path, 4)
    items, _ = load_records([path], require_description=True, progress=False)
    rows = sft_rows(items, ["anger", "fear"])
    row = rows[0]
    assert row["completion"][0]["content"] == items[0].record.description
    assert "### Ground Truth" not in row["prompt"][0]["content"]
    hint = row["hint_prompt"][0]["content"]
    assert hint.startswith(row["prompt"][0]["content"]) and "### Ground Truth" in hint
    assert ", ".join(items[0].record.AUs) in hint
    assert "Previous Response" not in hint


def test_collator_matches_trl_and_hints(home, tmp_path):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    root, _ = home
    path = write_toy_dataset(tmp_path, 8)
    items, _ = load_records([path], require_description=True, progress=False)
    ds = to_dataset(sft_rows(items, ["anger", "fear"]), "images")
    model, processor = models.load_model_and_processor(root / "tiny")
    examples = [ds[i] for i in range(len(ds))]
    ours = SFTCollator(processor, hint_fraction=0.0)([dict(e) for e in examples])
    trl = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)
    ref = trl([{k: v for k, v in e.items() if k != "hint_prompt"} for e in examples])
    for key in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"):
        assert torch.equal(ours[key], ref[key]), key
    # the loss is on the completion (and its end-of-turn token) only
    first = ours["labels"][0][ours["labels"][0] != -100]
    assert processor.tokenizer.decode(first).startswith(items[0].record.description)
    with torch.no_grad():
        assert model(**ours).logits.shape[:2] == ours["input_ids"].shape

    hinting = SFTCollator(processor, hint_fraction=0.5, seed=1)
    for _ in range(20):
        batch = hinting([dict(e) for e in examples])
    assert 0.3 < hinting.hinted_share < 0.7
    assert hinting.seen == 160
    hinted_len = batch["attention_mask"].sum(1)
    assert hinted_len.max() > ours["attention_mask"].sum(1).max()  # hinted prompts are longer


def test_plain_loss_equals_the_model_loss(home, tmp_path):
    import torch
    from facial_r1_training.sft import plain_loss_trainer

    root, _ = home
    path = write_toy_dataset(tmp_path, 4)
    items, _ = load_records([path], require_description=True, progress=False)
    ds = to_dataset(sft_rows(items, ["anger", "fear"]), "images")
    model, processor = models.load_model_and_processor(root / "tiny")
    batch = SFTCollator(processor)([ds[i] for i in range(4)])
    with torch.no_grad():
        expected = model(**batch).loss
        trainer = plain_loss_trainer().__new__(plain_loss_trainer())
        trainer._metrics = {"train": __import__("collections").defaultdict(list)}
        trainer._total_train_tokens = 0
        trainer.args = type("A", (), {"average_tokens_across_devices": False})()
        model.train()
        loss = trainer.compute_loss(model, dict(batch))
    assert torch.allclose(loss, expected, atol=1e-5)
    assert 0.0 <= trainer._metrics["train"]["mean_token_accuracy"][0] <= 1.0


def test_cached_collator_equals_the_processor(home, tmp_path):
    """Image paths: pixel values and prompt ids are cached, the batches stay the processor's."""
    import random

    import torch

    root, _ = home
    small = write_toy_dataset(tmp_path, 6)
    big = write_toy_dataset(tmp_path, 4, dataset="Big", size=112)  # resized by the processor
    items, _ = load_records([small, big], require_description=True, progress=False)
    rows = sft_rows(items, ["anger", "fear"])
    by_path = to_dataset(rows, "images", decode=False)
    decoded = to_dataset(rows, "images")
    assert isinstance(by_path[0]["images"][0], str)
    _, processor = models.load_model_and_processor(root / "tiny")
    cached = SFTCollator(processor, hint_fraction=0.5, seed=3)
    reference = SFTCollator(processor, hint_fraction=0.5, seed=3)  # PIL: the processor each time
    order = list(range(len(rows)))
    for epoch in range(3):
        random.Random(epoch).shuffle(order)
        for chunk in (order[:5], order[5:]):
            ours = cached([by_path[i] for i in chunk])
            ref = reference([decoded[i] for i in chunk])
            assert ours.keys() == ref.keys()
            for key in ref:
                assert torch.equal(ours[key], ref[key]), (epoch, key)
    assert cached._fast is True
    assert len(cached._pixels) == len(rows)  # each image processed once
    assert cached.cache_hits > 0 and cached.cache_misses >= len(rows)
    assert cached.hinted == reference.hinted and cached.seen == reference.seen == 30
    grids = {tuple(map(tuple, v["image_grid_thw"].tolist())) for v in cached._pixels.values()}
    unhinted = {k for k in cached._prompt_ids if "### Ground Truth" not in k[0]}
    assert len(unhinted) == len(grids)  # the shared prompt, tokenized once per image grid

    class Skewed(SFTCollator):  # a split text step that disagrees with the processor
        def _text_part(self, prompt, pixels):
            ids, mm = super()._text_part(prompt, pixels)
            return ids[:-1], mm

    skewed = Skewed(processor)
    ours = skewed([by_path[i] for i in range(4)])
    ref = SFTCollator(processor)([decoded[i] for i in range(4)])
    assert skewed._fast is False and not skewed._pixels
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key

    tight = SFTCollator(processor, cache_bytes=1)  # over budget: processed again, still right
    for _ in range(2):
        ours = tight([by_path[i] for i in range(4)])
    assert not tight._pixels and tight.cache_hits == 0
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


def test_completion_only_head_gives_the_full_logits_gradients(home, tmp_path):
    import collections

    import torch
    from facial_r1_training.sft import _backbone_and_head, plain_loss_trainer

    root, _ = home
    path = write_toy_dataset(tmp_path, 4)
    items, _ = load_records([path], require_description=True, progress=False)
    ds = to_dataset(sft_rows(items, ["anger", "fear"]), "images", decode=False)
    model, processor = models.load_model_and_processor(root / "tiny", trainable=True)
    assert _backbone_and_head(model) is not None  # the completion-only path is taken
    batch = SFTCollator(processor, hint_fraction=0.5)([ds[i] for i in range(4)])
    trainer_cls = plain_loss_trainer()
    trainer = trainer_cls.__new__(trainer_cls)
    trainer._metrics = {"train": collections.defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer.args = type("A", (), {"average_tokens_across_devices": False})()
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = model(**batch)
    full.loss.backward()
    assert torch.allclose(loss, full.loss, atol=1e-6)
    assert ours.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.allclose(ours[name], param.grad, atol=1e-6), name
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    expected = (full.logits[:, :-1].argmax(-1)[mask] == labels[mask]).float().mean().item()
    assert abs(trainer._metrics["train"]["mean_token_accuracy"][0] - expected) < 1e-6


def test_sft_trains_saves_and_skips_bad_records(home, env, tmp_path):
    root, profile = home
    bad = write_bad_file(root / "data")
    result = tmp_path / "sft.json"
    code = cli_main(
        [
            "sft",
            "--config",
            str(profile),
            *FAST,
            "--input",
            str(bad),
            "--input",
            "data/Toy_train.jsonl",
            "--output-dir",
            "runs/sft-a",
            "--result",
            str(result),
            "--skip-bad-records",
        ]
    )
    assert code == 0
    data = json.loads(result.read_text())
    m = data["metrics"]
    assert m["global_step"] == 4 and m["data_read"] == 32 and m["data_kept"] == 27
    assert m["data_rejected_bad_image"] == 1 and m["data_rejected_empty_description"] == 1
    assert m["s_per_step"] > 0 and 0 <= m["hinted_share"] <= 1
    model_dir = root / "runs/sft-a/model"
    assert data["outputs"]["model"] == str(model_dir)
    assert (model_dir / "facial_r1_training.json").is_file()
    model, processor = models.load_model_and_processor(model_dir)
    from PIL import Image

    out = models.generate(model, processor, ["q"], [Image.new("RGB", (56, 56))], max_new_tokens=4)
    assert len(out) == 1


def test_sft_with_lora(home, env, tmp_path):
    root, profile = home
    result = tmp_path / "lora.json"
    code = cli_main(
        [
            "sft",
            "--config",
            str(profile),
            *FAST,
            "--max-steps",
            "2",
            "--set",
            "model.use_lora=true",
            "--set",
            "sft.plain_loss=false",  # TRL's fused loss path
            "--set",
            "model.lora_r=4",
            "--output-dir",
            "runs/sft-lora",
            "--result",
            str(result),
        ]
    )
    assert code == 0
    model_dir = root / "runs/sft-lora/model"
    assert (model_dir / "model.safetensors").is_file()  # merged: a standalone model
    assert not (model_dir / "adapter_config.json").exists()


def test_sft_without_usable_records_fails_cleanly(home, env, tmp_path):
    _, profile = home
    empty = write_toy_dataset(tmp_path, 3, with_description=False)
    result = tmp_path / "r.json"
    code = cli_main(
        ["sft", "--config", str(profile), "--input", str(empty), "--result", str(result)]
    )
    assert code == 1
    assert not result.exists()
