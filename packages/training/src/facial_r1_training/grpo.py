"""Stage 2: GRPO with TRL's GRPOTrainer and the core rewards (``facial-r1 grpo``).

Rewards: ``facial_r1_core.rewards.reward_functions(variant)`` = [AU F1, emotion accuracy, format],
weighted by ``grpo.reward_weights`` (au/accuracy/format, default 1 each). The records' ``AUs`` and
``labels`` columns reach the reward functions as keyword arguments. Records without a decodable
image, or without AUs and labels, are rejected with reasons.

Logged per step (MLflow, from TRL's logs): ``rewards/<fn>/mean`` and ``/std`` for each component,
``reward`` (weighted total), ``kl``, ``completions/mean_length``, ``frac_reward_zero_std`` (the
share of groups whose G rewards are all equal, i.e. no learning signal; also logged as
``zero_variance_groups``), ``entropy``, ``clip_ratio/*``, ``s_per_step``.

Whether GRPO did anything (:mod:`facial_r1_training.grpo_diagnostics`): held-out reward before
and after (greedy, on ``grpo.heldout_size`` records kept out of training), mean KL, relative
weight change, share of zero-variance groups; mean KL below ``grpo.noop_kl_threshold`` logs a
warning and tags the run ``grpo_noop=true``. ``grpo.rollout_engine: continuous`` samples the
rollouts with our continuous-batching decoder (:mod:`facial_r1_training.rollout`) through TRL's
``rollout_func``.

On the GPU profile ``use_vllm``/``vllm_mode`` (colocate)/``vllm_gpu_memory_utilization``/
``vllm_tensor_parallel_size`` are passed through to TRL. Checkpoints and resume as for SFT.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

from . import distributed
from .configs import REWARD_NAMES, GRPOStageConfig, SFTStageConfig
from .data import grpo_rows, load_records, to_dataset
from .grpo_diagnostics import WeightChange, heldout_reward, split_heldout, summary_metrics
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

log = logging.getLogger("facial_r1.grpo")


def named_reward(fn, name: str):
    """``fn`` under a short name (TRL logs ``rewards/<name>/mean``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    wrapper.__name__ = name
    return wrapper


def reward_funcs(variant: str) -> list:
    from facial_r1_core.rewards import reward_functions

    return [
        named_reward(fn, name)
        for fn, name in zip(reward_functions(variant), REWARD_NAMES, strict=True)
    ]


def default_base_model(ctx) -> str:
    """The SFT stage's final model (``sft.model_dir`` or ``<sft.output_dir>/model``)."""
    from facial_r1_core.config import from_section

    sft = from_section(SFTStageConfig, ctx.profile.get("sft") or {}, name="sft")
    path: Path = ctx.path(sft.model_dir) if sft.model_dir else ctx.path(sft.output_dir) / "model"
    if not path.exists():
        raise FileNotFoundError(
            f"GRPO starts from the SFT model, but {path} does not exist: run `facial-r1 sft` "
            "first, or set grpo.base_model (or --model)"
        )
    return str(path)


def vllm_arguments(cfg: GRPOStageConfig) -> dict[str, Any]:
    """The GRPOConfig fields of the profile's vLLM keys (the one place they are mapped).

    ``use_vllm`` false: generation with the trained model itself. ``vllm_mode`` colocate: vLLM
    inside every training process, sharing its GPU. ``vllm_mode`` server: a separate server
    (``trl vllm-serve`` / ``vllm serve``) at ``vllm_server_host:vllm_server_port``; its size and
    memory share are the server's own flags, so only the connection settings go to the trainer.
    """
    if not cfg.use_vllm:
        return {"use_vllm": False}
    args: dict[str, Any] = {"use_vllm": True, "vllm_mode": cfg.vllm_mode}
    if cfg.vllm_mode == "colocate":
        args.update(
            vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            vllm_tensor_parallel_size=cfg.vllm_tensor_parallel_size,
            vllm_enable_sleep_mode=cfg.vllm_enable_sleep_mode,
        )
        return args
    if not cfg.vllm_server_host:
        raise ValueError(
            "grpo.vllm_mode=server needs grpo.vllm_server_host: the vLLM server's address "
            "(the Kubernetes runner sets its Service's DNS name)"
        )
    args.update(
        vllm_server_host=cfg.vllm_server_host,
        vllm_server_port=cfg.vllm_server_port,
        vllm_server_timeout=cfg.vllm_server_timeout,
        vllm_group_port=cfg.vllm_group_port,
    )
    return args


def run_grpo(ctx) -> tuple[dict[str, Any], dict[str, Any]]:
    """The body of ``facial-r1 grpo`` (see :func:`facial_r1_training.stage.run_stage`)."""
    from trl import GRPOConfig, GRPOTrainer

    from .models import load_model_and_processor

    cfg: GRPOStageConfig = ctx.config
    mcfg = model_section(ctx)
    files = [ctx.path(f) for f in cfg.train_files()]
    if not files:
        raise ValueError("grpo.train_file is empty: give the unified JSONL to train on")
    _, ckpt_dir, model_dir = output_paths(ctx, cfg)
    base = resolve_model(ctx, cfg.base_model) if cfg.base_model else default_base_model(ctx)
    state = begin_training(ctx, cfg, base=base, files=files)
    if state.done:
        return state.result["outputs"], state.result["metrics"]

    items, report = load_records(files, require_labels=True, max_samples=cfg.max_samples)
    log.info("grpo data: %s", report.summary())
    ctx.log_dict([r.to_dict() for r in report.rejections], "grpo/rejected.json")
    if not items:
        raise ValueError(
            f"no usable GRPO records in {', '.join(map(str, files))}: {report.summary()}"
        )
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    train_items, held_items = split_heldout(items, cfg.heldout_size, seed)
    held_rows = grpo_rows(held_items, cfg.emotions, cfg.question)
    dataset = to_dataset(grpo_rows(train_items, cfg.emotions, cfg.question), "image")

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
    targs.update(
        num_generations=cfg.num_generations,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        num_iterations=cfg.num_iterations,
        reward_weights=cfg.weights(),
        use_vllm=cfg.use_vllm,
        log_completions=cfg.log_completions,
    )
    targs.update(vllm_arguments(cfg))
    targs.update(cfg.trainer_kwargs)
    grpo_args = GRPOConfig(**targs)

    callback = mlflow_callback(ctx)
    rollout = None
    if cfg.rollout_engine == "continuous":
        from .rollout import make_rollout_func

        rollout = make_rollout_func(
            processor,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_completion_length,
            batch_size=cfg.rollout_batch_size,
        )
    trainer = exact_resume(GRPOTrainer)(
        model=model,
        reward_funcs=reward_funcs(cfg.reward_variant),
        args=grpo_args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[callback],
        rollout_func=rollout,
    )
    resume_from = last_checkpoint(ckpt_dir) if state.status == "resume" else None
    start_step = 0
    if resume_from:
        saved = json.loads((Path(resume_from) / "trainer_state.json").read_text())
        start_step = int(saved.get("global_step", 0))
        log.info("resuming GRPO from %s (step %s)", resume_from, start_step)
    ctx.set_tags(
        {"resumed_from_step": start_step, "base_model": base, "reward_variant": cfg.reward_variant}
    )

    def held_out() -> dict[str, float]:
        return heldout_reward(
            model,
            processor,
            held_rows,
            variant=cfg.reward_variant,
            weights=cfg.weights(),
            max_new_tokens=cfg.max_completion_length,
        )

    t_held = time.time()
    reward_before = held_out()
    weights = WeightChange()
    if cfg.track_weight_change:
        weights.snapshot(model)
    t0 = time.time()
    result = train(trainer, resume_from, callback)
    train_time = time.time() - t0
    reward_after = held_out()
    weight_change = weights.relative(model)
    diagnostics_time = time.time() - t0 - train_time + (t0 - t_held)
    steps = int(trainer.state.global_step)
    s_per_step = callback.seconds_per_step(steps)
    rank, world = distributed.world()
    log.info("grpo: rank %d of %d trained %d steps", rank, world, steps)
    save_final(
        trainer,
        processor,
        model_dir,
        merge_lora=mcfg.merge_lora,
        extra={
            "facial_r1_training.json": {
                "stage": "grpo",
                "base_model": base,
                "steps": steps,
                "config_hash": ctx.config_hash,
                "train_files": [str(f) for f in files],
                "reward_variant": cfg.reward_variant,
                "reward_weights": dict(zip(REWARD_NAMES, cfg.weights(), strict=True)),
            },
        },
    )
    history = callback.history
    keys = [
        "reward",
        *[f"rewards/{n}/mean" for n in REWARD_NAMES],
        "kl",
        "completions/mean_length",
        "frac_reward_zero_std",
    ]
    fig = plot_history(history, keys, "GRPO")
    if fig is not None:
        ctx.log_figure(fig, "grpo/curves.png")

    def mean_of(key: str) -> float | None:
        values = [h[key] for h in history if key in h]
        return sum(values) / len(values) if values else None

    metrics: dict[str, Any] = {
        **report.metrics(),
        "train_loss": result.training_loss,
        "global_step": steps,
        "resumed_from_step": start_step,
        "train_time_s": round(train_time, 3),
        "diagnostics_time_s": round(diagnostics_time, 3),
        "samples": len(train_items),
        "heldout_samples": len(held_items),
        "world_size": world,
    }
    for key, name in [
        ("reward", "mean_reward"),
        ("kl", "mean_kl"),
        ("completions/mean_length", "mean_completion_length"),
        ("frac_reward_zero_std", "mean_zero_variance_groups"),
        *[(f"rewards/{n}/mean", f"mean_reward_{n}") for n in REWARD_NAMES],
    ]:
        value = mean_of(key)
        if value is not None:
            metrics[name] = value
    if s_per_step is not None:
        metrics["s_per_step"] = round(s_per_step, 4)
    found, noop = summary_metrics(
        reward_before, reward_after, weight_change, metrics.get("mean_kl"), cfg.noop_kl_threshold
    )
    metrics.update(found)
    if noop is not None:
        ctx.set_tags({"grpo_noop": "true" if noop else "false"})
    if noop:
        log.warning(
            "GRPO did not move the policy: mean KL %s (threshold %.2g), relative weight change "
            "%s, held-out reward %s -> %s; raise learning_rate, max_steps or prompts per step",
            metrics.get("mean_kl"),
            cfg.noop_kl_threshold,
            found.get("relative_weight_change"),
            found.get("heldout_reward_before"),
            found.get("heldout_reward_after"),
        )
    log.info(
        "GRPO diagnostics: %s",
        {k: round(v, 5) for k, v in found.items()},
    )
    outputs = {"model": str(model_dir), "checkpoints": str(ckpt_dir)}
    if cfg.log_model and trainer.is_world_process_zero():
        if ctx.mlflow_run_id:
            from .mlflow_model import log_candidate

            logged = log_candidate(ctx, model_dir)
            outputs.update(logged["outputs"])
            metrics.update(logged["metrics"])
        else:
            log.warning("untracked run: the final model is not logged to MLflow")
    state.complete(outputs, metrics, [model_dir])
    return outputs, metrics
