"""Stage 1: supervised fine-tuning with TRL's SFTTrainer (``facial-r1 sft``).

Data: unified JSONL whose ``description`` is the completion; records with an empty description or
a missing/undecodable image are rejected with reasons (counted, logged as ``sft/rejected.jsonl``).
Prompt: the paper's SFT prompt; a share ``sft.hint_fraction`` of prompts per batch carries the
ground-truth block (:class:`facial_r1_training.data.SFTCollator`). Loss on the completion
only (conversational prompt-completion rows). ``sft.plain_loss`` computes the loss from the
completion positions' logits (fast on CPU with a small vocabulary); false uses TRL's fused,
chunked LM-head loss (memory-lean for 150k-token vocabularies on GPU). Images are cached by
the collator as pixel values, once per run. Checkpoints in ``<output_dir>/checkpoints``; a
rerun resumes from the newest complete checkpoint (``resume`` false or ``--fresh`` starts
over); a finished run re-run with the same inputs and settings returns its result without
training, and a changed fingerprint is refused (:func:`trainer_common.begin_training`).
The final model + processor are written atomically to ``<output_dir>/model``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from . import distributed
from .configs import SFTStageConfig
from .data import SFTCollator, load_records, sft_rows, to_dataset
from .trainer_common import (
    begin_training,
    common_args,
    exact_resume,
    last_checkpoint,
    mlflow_callback,
    model_section,
    output_paths,
    plot_history,
    resolve_model,
    save_final,
    train,
)

log = logging.getLogger("facial_r1.sft")


def run_sft(ctx) -> tuple[dict[str, Any], dict[str, Any]]:
    """The body of ``facial-r1 sft`` (see :func:`facial_r1_training.stage.run_stage`)."""
    from trl import SFTConfig

    from .models import load_model_and_processor

    cfg: SFTStageConfig = ctx.config
    mcfg = model_section(ctx)
    files = [ctx.path(f) for f in cfg.train_files()]
    if not files:
        raise ValueError("sft.train_file is empty: give the unified JSONL to train on")
    _, ckpt_dir, model_dir = output_paths(ctx, cfg)
    base = resolve_model(ctx, cfg.base_model or mcfg.path)
    state = begin_training(ctx, cfg, base=base, files=files)
    if state.done:
        return state.result["outputs"], state.result["metrics"]

    items, report = load_records(files, require_description=True, max_samples=cfg.max_samples)
    log.info("sft data: %s", report.summary())
    ctx.log_dict([r.to_dict() for r in report.rejections], "sft/rejected.json")
    for rej in report.rejections[:20]:
        log.warning("rejected %s:%s [%s] %s", rej.path, rej.line, rej.code, rej.reason)
    if not items:
        raise ValueError(
            f"no usable SFT records in {', '.join(map(str, files))}: {report.summary()}"
        )
    # image paths, not decoded images: the collator caches each image's pixel values once
    dataset = to_dataset(sft_rows(items, cfg.emotions, cfg.question), "images", decode=False)

    model, processor = load_model_and_processor(
        base,
        dtype=mcfg.dtype,
        lora=mcfg.lora_settings(),
        quantization=mcfg.quantization,
        attn_implementation=mcfg.attn_implementation,
        min_pixels=mcfg.min_pixels,
        max_pixels=mcfg.max_pixels,
        trainable=True,
    )
    targs = common_args(ctx, cfg, ckpt_dir)
    targs["max_length"] = cfg.max_length
    targs.setdefault("dataset_kwargs", {"skip_prepare_dataset": True})
    sft_args = SFTConfig(**targs)

    tokenizer = processor.tokenizer
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    collator = SFTCollator(
        processor, hint_fraction=cfg.hint_fraction, seed=sft_args.seed, max_length=cfg.max_length
    )
    callback = mlflow_callback(ctx, extra=lambda: {"hinted_share": collator.hinted_share})
    trainer_cls = exact_resume(plain_loss_trainer() if cfg.plain_loss else _trl_sft_trainer())
    trainer = trainer_cls(
        model=model,
        args=sft_args,
        train_dataset=dataset,
        processing_class=processor,
        data_collator=collator,
        callbacks=[callback],
    )
    resume_from = last_checkpoint(ckpt_dir) if state.status == "resume" else None
    start_step = 0
    if resume_from:
        start_step = json.loads((ctx.path(resume_from) / "trainer_state.json").read_text()).get(
            "global_step", 0
        )
        log.info("resuming SFT from %s (step %s)", resume_from, start_step)
        collator.calls = start_step * cfg.gradient_accumulation_steps  # the same hint draws
    ctx.set_tags({"resumed_from_step": start_step, "base_model": base})

    t0 = time.time()
    result = train(trainer, resume_from, callback)
    train_time = time.time() - t0
    steps = int(trainer.state.global_step)
    s_per_step = callback.seconds_per_step(steps)
    rank, world = distributed.world()
    log.info("sft: rank %d of %d trained %d steps", rank, world, steps)

    save_final(
        trainer,
        processor,
        model_dir,
        merge_lora=mcfg.merge_lora,
        extra={
            "facial_r1_training.json": {
                "stage": "sft",
                "base_model": base,
                "steps": steps,
                "config_hash": ctx.config_hash,
                "train_files": [str(f) for f in files],
                "hint_fraction": cfg.hint_fraction,
            },
        },
    )
    fig = plot_history(callback.history, ["loss", "learning_rate", "grad_norm"], "SFT")
    if fig is not None:
        ctx.log_figure(fig, "sft/curves.png")
    metrics: dict[str, Any] = {
        **report.metrics(),
        "train_loss": result.training_loss,
        "global_step": steps,
        "resumed_from_step": start_step,
        "train_time_s": round(train_time, 3),
        "hinted_share": round(collator.hinted_share, 4),
        "samples": len(items),
        "world_size": world,
        "collator_cache_hits": collator.cache_hits,
        "collator_cache_misses": collator.cache_misses,
        "collator_cache_mb": round(collator.cached_bytes / 2**20, 1),
    }
    if s_per_step is not None:
        metrics["s_per_step"] = round(s_per_step, 4)
    losses = [h["loss"] for h in callback.history if "loss" in h]
    if losses:
        metrics["final_loss"] = losses[-1]
    outputs = {"model": str(model_dir), "checkpoints": str(ckpt_dir)}
    state.complete(outputs, metrics, [model_dir])
    return outputs, metrics


def _trl_sft_trainer():
    from trl import SFTTrainer

    return SFTTrainer


def _backbone_and_head(model):
    """(backbone, LM head) of a causal LM whose forward is ``head(backbone(...)[0])``, or None.

    Transformers models expose the backbone as ``base_model`` (``model.model`` for
    Qwen2.5-VL, vision tower included) and the head as ``get_output_embeddings()``; a PEFT
    wrapper is looked through (its LoRA layers live inside those modules).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, "base_model", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if backbone is None or backbone is inner or head is None:
        return None
    return backbone, head


def plain_loss_trainer():
    """SFTTrainer whose loss is token cross-entropy on the completion tokens' logits.

    Only the positions that predict a completion token go through the LM head (the prompt,
    image and padding positions, ~80 % of a tiny-profile batch, have no label), which gives the
    same loss as the full logits at a fraction of the head's and the softmax's cost. Models
    without a separable backbone/head, wrapped (distributed) models and ``return_outputs``
    callers get the full logits.
    """
    import torch
    from trl import SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            labels = inputs.pop("labels")
            inputs["use_cache"] = False
            target = labels[:, 1:]
            mask = target != -100
            parts = None
            accelerator = getattr(self, "accelerator", None)
            unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
            if not return_outputs and unwrapped is model:
                parts = _backbone_and_head(model)
            if parts is not None:
                backbone, head = parts
                outputs = None
                hidden = backbone(**inputs).last_hidden_state[:, :-1]
                mask = mask.to(hidden.device)
                logits = head(hidden[mask]).float()
                target = target.to(logits.device)[mask]
            else:
                outputs = model(**inputs)
                logits = outputs.logits[:, :-1, :].float()
                target = target.to(logits.device)
                mask = mask.to(logits.device)
            n_tokens = mask.sum()
            denom = num_items_in_batch if num_items_in_batch is not None else n_tokens
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                target.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ) / torch.as_tensor(denom, device=logits.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            with torch.no_grad():
                hits = logits.argmax(-1) == target
                correct = hits.sum() if parts is not None else (hits & mask).sum()
                acc = (correct / n_tokens).item() if n_tokens > 0 else 0.0
            self._metrics[mode]["mean_token_accuracy"].append(acc)
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return PlainLossSFTTrainer
