"""The tiny Qwen2.5-VL: build, offline load, processor, generation, LoRA adapters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from facial_r1_training import models
from PIL import Image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "tiny"
    summary = models.build_tiny(out)
    return out, summary


def test_build_summary_and_files(tiny):
    out, summary = tiny
    assert 300_000 < summary["parameters"] < 600_000
    assert summary["image_tokens"] == 4
    assert summary["prompt_tokens"] < 20  # the constant prompt compresses: short sequences
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
        "processing_facial_r1.py",
        models.TINY_MARKER,
    ):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".tiny.*"))  # no temporary folder left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl"


def test_tokenizer_specials_padding_and_round_trip(tiny):
    out, _ = tiny
    _, processor = models.load_model_and_processor(out)
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [0, 1, 2]
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.padding_side == "left"
    text = "<think>Unseen wörds: lip corner puller (AU12) zebra 123.</think>\n<answer>fear</answer>"
    assert tok.decode(tok(text).input_ids) == text


def test_chat_template_and_image_tokens(tiny):
    out, _ = tiny
    _, processor = models.load_model_and_processor(out)
    messages = models.chat_messages("hello")
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hello<|im_end|>\n" in text
    batch = processor(text=[text], images=[Image.new("RGB", (120, 120))], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # a square image of any size becomes 56x56, i.e. 4 image tokens
    assert int((batch["input_ids"] == image_id).sum()) == 4
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_offline_from_pretrained_in_a_fresh_process(tiny):
    out, _ = tiny
    code = f"""
from transformers import AutoModelForImageTextToText, AutoProcessor
p = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
m = AutoModelForImageTextToText.from_pretrained({str(out)!r})
import facial_r1_training.processing
q = AutoProcessor.from_pretrained({str(out)!r})
print(type(p).__name__, type(q).__name__, type(m).__name__, type(p.image_processor).__name__)
"""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": "/usr/bin:/bin",
    }
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=str(out.parent),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [
        "FacialR1VLProcessor",
        "FacialR1VLProcessor",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2VLImageProcessorPil",
    ]


def test_generate_batch(tiny):
    out, _ = tiny
    model, processor = models.load_model_and_processor(out)
    assert not model.training
    images = [Image.new("RGB", (56, 56), c) for c in ((255, 0, 0), (0, 0, 255), (0, 0, 0))]
    texts = models.generate(
        model, processor, ["a", "a longer prompt", "b"], images, max_new_tokens=5
    )
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    sampled = models.generate(
        model, processor, ["a"], images[:1], max_new_tokens=5, do_sample=True, temperature=0.8
    )
    assert len(sampled) == 1
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        models.generate(model, processor, ["a", "b"], images[:1])


def test_lora_adapter_save_load_merge(tiny, tmp_path):
    import torch

    out, _ = tiny
    model, processor = models.load_model_and_processor(
        out, lora=models.LoraSettings(r=4, alpha=8, dropout=0.0), trainable=True
    )
    assert models.is_peft_model(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < total / 2
    # make the adapter non-trivial so that merging changes the outputs
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    adapter_dir = models.save_adapter(model, tmp_path / "adapter", processor)
    assert (adapter_dir / "adapter_config.json").is_file()
    loaded, proc2 = models.load_model_and_processor(adapter_dir)
    assert models.is_peft_model(loaded)
    ids = processor.tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        a = loaded(input_ids=ids).logits
        merged_dir = models.save_merged(loaded, proc2, tmp_path / "merged")
        merged, _ = models.load_model_and_processor(merged_dir)
        assert not models.is_peft_model(merged)
        b = merged(input_ids=ids).logits
        base, _ = models.load_model_and_processor(out)
        c = base(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(b, c, atol=1e-3)
    # the same through the command line
    from facial_r1_core.cli import main as cli_main

    assert (
        cli_main(["model", "merge-lora", str(adapter_dir), "--output-dir", str(tmp_path / "m2")])
        == 0
    )
    assert (tmp_path / "m2" / "model.safetensors").is_file()
    assert not (tmp_path / "m2" / "adapter_config.json").exists()


def test_build_tiny_command(tmp_path, monkeypatch):
    from facial_r1_core.cli import main as cli_main
    from facial_r1_training.testing import write_profile

    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    profile = write_profile(
        tmp_path / "p.yaml",
        {
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/m.db", "experiment": "model-tests"},
            "model": {"path": "runs/model/tiny", "tiny": {"num_hidden_layers": 1}},
        },
    )
    result = tmp_path / "r.json"
    assert cli_main(["model", "build-tiny", "--config", str(profile), "--result", str(result)]) == 0
    data = json.loads(result.read_text())
    assert data["stage"] == "model-build-tiny" and data["status"] == "ok"
    assert data["outputs"]["model"] == str(tmp_path / "runs/model/tiny")
    cfg = json.loads((tmp_path / "runs/model/tiny/config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 1
    assert data["metrics"]["image_tokens"] == 4


def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((FileNotFoundError, OSError)):
        models.load_model_and_processor(tmp_path / "nope")


def test_resolve_dtype():
    import torch

    assert models.resolve_dtype("bf16") is torch.bfloat16
    assert models.resolve_dtype(None) == "auto"
    with pytest.raises(ValueError, match="unknown dtype"):
        models.resolve_dtype("floatX")
