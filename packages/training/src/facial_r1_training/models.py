"""Models: the tiny offline Qwen2.5-VL, loading a folder or hub id, LoRA/QLoRA, adapters.

API (stable; the synthesis, evaluation and analyze commands rely on it)::

    from facial_r1_training.models import load_model_and_processor, chat_messages, generate

    model, processor = load_model_and_processor("runs/model/tiny")   # folder or hub id
    messages = chat_messages(prompt_text)          # [{"role": "user", "content": [image, text]}]
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)]
    batch = processor(text=texts, images=[pil_image], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=96, do_sample=False)
    completions = processor.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                         skip_special_tokens=True)
    # or, the same in one call:  generate(model, processor, [prompt_text], [pil_image])

* ``load_model_and_processor(path_or_hub_id, dtype="auto"|"float32"|"bfloat16"|...,
  lora=None|LoraSettings, quantization=None|"4bit"|"8bit", device_map=None)`` returns
  ``(model, processor)``; the model is in eval mode, the processor pads on the left (as batched
  generation needs). A folder built by ``facial-r1 model build-tiny`` (or saved by SFT/GRPO from
  it) loads our image-only processor; any other folder or hub id uses ``AutoProcessor``.
* Image size: the tiny processor is pinned to ``min_pixels = max_pixels = 56*56``, so a square
  image of any size is resized to 56x56 and becomes 4 image tokens (``model.tiny.image_size:
  112`` gives 16; non-square images keep their aspect ratio, rounded to multiples of 28 px).
  The real Qwen2.5-VL processor keeps its own limits (``model.min_pixels``/``max_pixels``).
* ``save_model(model, processor, out_dir)`` writes atomically (tmp dir, then rename).
  ``merge_adapter(model)`` folds LoRA weights back; ``save_adapter`` saves only the adapter.

``facial-r1 model build-tiny --out DIR`` writes a random-init tiny Qwen2.5-VL (about 440k
parameters) with its offline byte-level BPE tokenizer and the processor, loadable with
``from_pretrained(DIR)`` under ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("facial_r1.models")

TINY_MARKER = "facial_r1_tiny.json"


@dataclasses.dataclass
class TinyModelSpec:
    """Sizes of the tiny stand-in (~440k parameters); mrope sections must sum to head_dim/2."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    rope_theta: float = 1e6
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_num_heads: int = 4
    image_size: int = 56
    vocab_size: int = 2000
    max_position_embeddings: int = 4096
    seed: int = 0


@dataclasses.dataclass
class LoraSettings:
    """peft LoRA options (``model.lora`` in a profile); QLoRA = LoRA + ``quantization``."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Sequence[str] | str = "all-linear"


def tiny_config(spec: TinyModelSpec, tokenizer):
    """The Qwen2_5_VLConfig of the tiny model, token ids taken from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    head_dim = spec.hidden_size // spec.num_attention_heads
    if sum(spec.mrope_section) * 2 != head_dim:
        raise ValueError(
            f"mrope_section {list(spec.mrope_section)} must sum to head_dim/2 = {head_dim // 2}"
        )
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in (
            "<|endoftext|>",
            "<|im_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<|vision_start|>",
            "<|vision_end|>",
        )
    }
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": list(spec.mrope_section),
            "rope_theta": spec.rope_theta,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": True,
    }
    vision_config = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_heads": spec.vision_num_heads,
        "out_hidden_size": spec.hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1] if spec.vision_depth > 1 else [0],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny(
    out_dir: str | os.PathLike,
    spec: TinyModelSpec | None = None,
    *,
    extra_texts: Sequence[str] = (),
) -> dict[str, Any]:
    """Build, save (atomically) and describe the tiny model; returns a summary dict.

    ``extra_texts`` (e.g. seed completions) are added to the tokenizer's training corpus.
    """
    import torch
    from facial_r1_core.prompts import sft_prompt
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from .processing import build_processor, tokenizer_corpus, train_tokenizer

    spec = spec or TinyModelSpec()
    tokenizer = train_tokenizer(tokenizer_corpus(extra_texts), vocab_size=spec.vocab_size)
    processor = build_processor(spec.image_size, tokenizer=tokenizer)
    config = tiny_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    n_params = sum(p.numel() for p in model.parameters())
    summary = {
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "image_size": spec.image_size,
        "image_tokens": (spec.image_size // 28) ** 2,
        "prompt_tokens": len(tokenizer(sft_prompt()).input_ids),
        "spec": dataclasses.asdict(spec),
    }
    save_model(model, processor, out_dir, extra_files={TINY_MARKER: summary})
    return summary


def _ship_processor_code(folder: Path) -> None:
    from .processing import FacialR1VLProcessor, ship_remote_code

    cfg = folder / "processor_config.json"
    if cfg.is_file() and FacialR1VLProcessor.__name__ in cfg.read_text():
        ship_remote_code(folder)


def save_model(
    model,
    processor,
    out_dir: str | os.PathLike,
    *,
    extra_files: dict[str, Any] | None = None,
    safe_serialization: bool = True,
) -> Path:
    """Save model + processor into ``out_dir`` atomically (sibling tmp dir, then rename)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=safe_serialization)
        if processor is not None:
            processor.save_pretrained(str(tmp))
            _ship_processor_code(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` with two renames."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def resolve_dtype(dtype: str | Any | None):
    """``"auto"``/None -> ``"auto"``; names like ``"bfloat16"``/``"bf16"`` -> torch dtypes."""
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
    }
    name = aliases.get(str(dtype), str(dtype))
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return value


def is_local_model(path_or_id: str | os.PathLike) -> bool:
    return Path(path_or_id).is_dir()


def load_processor(
    path_or_id: str | os.PathLike, *, min_pixels: int | None = None, max_pixels: int | None = None
):
    """The processor of a model folder or hub id, left-padded for batched generation."""
    from .processing import load_processor as _load

    kwargs: dict[str, Any] = {}
    if min_pixels:
        kwargs["min_pixels"] = int(min_pixels)
    if max_pixels:
        kwargs["max_pixels"] = int(max_pixels)
    processor = _load(path_or_id, **kwargs)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_model_and_processor(
    path_or_id: str | os.PathLike,
    *,
    dtype: str | Any | None = "auto",
    lora: LoraSettings | dict[str, Any] | None = None,
    quantization: str | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trainable: bool = False,
):
    """Load ``(model, processor)`` from a local folder or a hub id.

    ``lora`` wraps the model with a fresh peft LoRA adapter (full fine-tune when None); a folder
    holding ``adapter_config.json`` is loaded as base + adapter. ``quantization="4bit"|"8bit"``
    (QLoRA; needs bitsandbytes and a GPU). ``trainable=False`` returns the model in eval mode.
    """
    from transformers import AutoModelForImageTextToText

    path = str(path_or_id)
    if not is_local_model(path) and os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in path:
        raise FileNotFoundError(f"model folder not found: {path}")
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        kwargs["quantization_config"] = _quantization_config(quantization)
    adapter_cfg = Path(path) / "adapter_config.json"
    if adapter_cfg.is_file():
        from peft import PeftModel

        base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_cfg}: no base_model_name_or_path")
        model = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
        model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
        processor_src = path if (Path(path) / "processor_config.json").is_file() else base
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor_src = path
    if quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    if lora is not None:
        model = apply_lora(model, lora)
    processor = load_processor(processor_src, min_pixels=min_pixels, max_pixels=max_pixels)
    if trainable:
        model.train()
    else:
        model.eval()
    return model, processor


def _quantization_config(kind: str):
    import torch
    from transformers import BitsAndBytesConfig

    if kind in ("4bit", "nf4", "qlora"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be 4bit or 8bit, got {kind!r}")


def lora_config(settings: LoraSettings | dict[str, Any]):
    """A peft ``LoraConfig`` for causal LM training of the language model."""
    from peft import LoraConfig

    if isinstance(settings, dict):
        settings = LoraSettings(**settings)
    targets = settings.target_modules
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )


def apply_lora(model, settings: LoraSettings | dict[str, Any]):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(settings))


def is_peft_model(model) -> bool:
    with contextlib.suppress(ImportError):
        from peft import PeftModel

        return isinstance(model, PeftModel)
    return False


def merge_adapter(model):
    """Fold a LoRA adapter into the base weights; returns the plain transformers model."""
    if is_peft_model(model):
        return model.merge_and_unload()
    return model


def save_adapter(model, out_dir: str | os.PathLike, processor=None) -> Path:
    """Save only the adapter weights (+ processor) atomically."""
    if not is_peft_model(model):
        raise ValueError("save_adapter needs a peft model (the model has no LoRA adapter)")
    return save_model(model, processor, out_dir)


def save_merged(model, processor, out_dir: str | os.PathLike) -> Path:
    """Merge a LoRA adapter (if any) and save a standalone model + processor atomically."""
    return save_model(merge_adapter(model), processor, out_dir)


def chat_messages(prompt: str, *, image: bool = True) -> list[dict[str, Any]]:
    """One user turn: an image block (if ``image``) then the prompt text.

    >>> chat_messages("hi")
    [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'hi'}]}]
    """
    content: list[dict[str, Any]] = [{"type": "image"}] if image else []
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def generate(
    model,
    processor,
    prompts: Sequence[str],
    images: Sequence[Any],
    *,
    max_new_tokens: int = 96,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """Batched generation: one prompt text + one PIL image per sample; returns completions."""
    import torch

    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    if not prompts:
        return []
    texts = [
        processor.apply_chat_template(chat_messages(p), add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    batch = processor(text=texts, images=list(images), return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
    tokenizer = getattr(processor, "tokenizer", processor)
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    with torch.inference_mode():
        out = model.generate(**batch, **gen_kwargs)
    new = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
