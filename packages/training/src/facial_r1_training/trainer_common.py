"""What the SFT and GRPO stages share: model choice, TRL arguments, checkpoints, MLflow logging."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from facial_r1_core.config import from_section

from .configs import ModelStageConfig, TrainerCommon

log = logging.getLogger("facial_r1.training")

CHECKPOINTS = "checkpoints"


def model_section(ctx) -> ModelStageConfig:
    return from_section(ModelStageConfig, ctx.profile.get("model") or {}, name="model")


def resolve_model(ctx, value: str) -> str:
    """A profile model reference: an existing local folder (made absolute), a registry URI
    (``models:/NAME@ALIAS``, ``models:/<model_id>``, ``runs:/``; downloaded through MLflow, e.g.
    the champion for ``init_from=champion``) or a hub id."""
    if value.startswith(("models:/", "runs:/")):
        from .analyze import resolve_model as resolve_uri

        return resolve_uri(value, ctx.profile)
    local = ctx.path(value)
    if local.exists():
        return str(local)
    if value.startswith((".", "/", "~")) or value.count("/") != 1:
        raise FileNotFoundError(
            f"model folder not found: {local} (build it with `facial-r1 model build-tiny` or "
            "give a hub id like Qwen/Qwen2.5-VL-7B-Instruct)"
        )
    return value


def output_paths(ctx, cfg: TrainerCommon) -> tuple[Path, Path, Path]:
    """(output_dir, checkpoint_dir, final model dir)."""
    out = ctx.path(cfg.output_dir)
    model_dir = ctx.path(cfg.model_dir) if cfg.model_dir else out / "model"
    return out, out / CHECKPOINTS, model_dir


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete ``checkpoint-N`` folder, or None.

    Complete: its ``trainer_state.json`` (the trainer writes it last) parses; a checkpoint cut
    short by a kill while that file was written is passed over.
    """
    if not checkpoint_dir.is_dir():
        return None
    done = []
    for child in checkpoint_dir.iterdir():
        if child.is_dir() and child.name.startswith("checkpoint-"):
            try:
                step = int(child.name.split("-", 1)[1])
            except ValueError:
                continue
            if _readable_state(child / "trainer_state.json"):
                done.append((step, child))
    return str(max(done)[1]) if done else None


#: Keys that do not change what a training run produces (or that enter the fingerprint by
#: content: the train files and the base model), left out of the resume fingerprint.
NOT_FINGERPRINTED = (
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "resume",
    "dataloader_num_workers",
    "output_dir",
    "model_dir",
    "accelerate_config",
    "train_file",
    "base_model",
)


def begin_training(ctx, cfg: TrainerCommon, *, base: str, files: list[Path]):
    """The resume rule for a training stage (:meth:`StageContext.resume_state`).

    Fingerprint: the train files' and the base model's content, the stage's settings (except
    :data:`NOT_FINGERPRINTED`), the ``model`` section's loading settings and the seed. Returns
    the state: ``done`` (return ``state.result``), ``resume`` (from the newest checkpoint) or
    ``new`` (checkpoints of an earlier run are removed first).
    """
    from . import distributed

    out = output_paths(ctx, cfg)[0]
    distributed.start(cfg.use_cpu)
    if distributed.active():
        # rank 0 decides (and clears old checkpoints) while the others wait; they follow it
        from facial_r1_core.resume import STATE_FILE, StageState

        mine: dict[str, Any] = {}

        def decide():
            mine["state"] = _begin_training(ctx, cfg, base=base, files=files)
            return mine["state"].status, mine["state"].result

        status, result = distributed.decide(decide)
        rank, size = distributed.world()
        log.info("%s: rank %d of %d: %s", ctx.stage, rank, size, status)
        if "state" in mine:
            return mine["state"]
        return StageState(ctx.stage, out / STATE_FILE, {}, status, result, readonly=True)
    return _begin_training(ctx, cfg, base=base, files=files)


def _begin_training(ctx, cfg: TrainerCommon, *, base: str, files: list[Path]):
    out, ckpt_dir, _ = output_paths(ctx, cfg)
    fresh = not cfg.resume
    model = dataclasses.asdict(model_section(ctx))
    settings = {
        ctx.section: {
            k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_FINGERPRINTED
        },
        "model": {k: v for k, v in model.items() if k not in ("path", "tiny")},
        "run": {"seed": cfg.seed if cfg.seed is not None else ctx.seed},
    }
    state = ctx.resume_state(
        out,
        inputs={"train_file": [str(f) for f in files], "base_model": base},
        settings=settings,
        fresh=fresh,
        leftovers=last_checkpoint(ckpt_dir) is not None,
    )
    if state.status == "new" and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    if state.done:
        log.info(
            "%s: finished earlier with the same inputs and settings; returning that result "
            "(pass --fresh to train again)",
            ctx.stage,
        )
    return state


def _readable_state(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def checkpointing_keyword(arguments_class: type | None = None) -> str:
    """The TrainingArguments field that switches activation checkpointing on.

    ``activation_checkpointing`` in the transformers of the CPU lock; the GPU image's transformers
    (inside vLLM's range, requirements/README.md) only has its older name
    ``gradient_checkpointing``. Same switch, same effect.
    """
    import dataclasses

    if arguments_class is None:
        import transformers

        arguments_class = transformers.TrainingArguments
    names = {f.name for f in dataclasses.fields(arguments_class)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )


def common_args(ctx, cfg: TrainerCommon, checkpoint_dir: Path) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and GRPOConfig."""
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    args: dict[str, Any] = {
        "output_dir": str(checkpoint_dir),
        "max_steps": cfg.max_steps if cfg.max_steps is not None else -1,  # None: epochs
        "num_train_epochs": cfg.num_train_epochs,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "use_cpu": cfg.use_cpu,
        "bf16": cfg.bf16,
        "fp16": cfg.fp16,
        checkpointing_keyword(): cfg.activation_checkpointing,
        "dataloader_num_workers": cfg.dataloader_num_workers,
        "seed": seed,
        "data_seed": seed,
        "report_to": "none",  # our callback logs to the stage's MLflow run
        "remove_unused_columns": False,
        "disable_tqdm": False,
    }
    if cfg.deepspeed:
        args["deepspeed"] = str(ctx.path(cfg.deepspeed))
    args.update(cfg.trainer_kwargs)
    return args


def exact_resume(trainer_cls):
    """``trainer_cls`` whose resume loads the checkpoint's weights through ``from_pretrained``.

    ``save_pretrained`` writes a model's weights under their checkpoint names (for Qwen2.5-VL:
    ``model.layers.*``, ``visual.*``), while the Trainer's resume loads the file into the live
    model by its runtime names (``model.language_model.layers.*``, ``model.visual.*``) without
    strictness: no weight matches, and the run silently continues from the base weights. Here
    the checkpoint is loaded by the model class (which maps the names) and copied in strictly.
    LoRA adapters, sharded, FSDP and DeepSpeed checkpoints keep the Trainer's own path.
    """
    from .models import is_peft_model

    class ExactResume(trainer_cls):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            target = model if model is not None else self.model
            weights = Path(resume_from_checkpoint) / "model.safetensors"
            if (
                not weights.is_file()
                or is_peft_model(target)
                or getattr(self, "is_fsdp_enabled", False)
                or not hasattr(type(target), "from_pretrained")
            ):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            dtype = next(target.parameters()).dtype
            loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype)
            target.load_state_dict(loaded.state_dict(), strict=True)
            log.info("loaded the weights of %s", resume_from_checkpoint)

    ExactResume.__name__ = ExactResume.__qualname__ = trainer_cls.__name__
    return ExactResume


def train(trainer, resume_from: str | None, callback=None):
    """``trainer.train(resume_from_checkpoint=...)``, except when that checkpoint already holds
    the last step (a run killed between its final checkpoint and saving the model): the Trainer
    would then train one step more (600 -> 601); here the checkpoint's weights and state are
    loaded instead, so the final model equals the uninterrupted run's. Returns an object with
    ``training_loss`` (the mean logged loss in that case)."""
    from types import SimpleNamespace

    if resume_from:
        saved = json.loads((Path(resume_from) / "trainer_state.json").read_text())
        target = int(saved.get("max_steps") or 0)
        if target and int(saved.get("global_step", 0)) >= target:
            from transformers import TrainerState

            log.info("%s holds the last step (%s): no training left", resume_from, target)
            trainer._load_from_checkpoint(resume_from)
            trainer.state = TrainerState.load_from_json(
                str(Path(resume_from) / "trainer_state.json")
            )
            history = [dict(h) for h in trainer.state.log_history]
            if callback is not None:
                callback.history = history
            losses = [h["loss"] for h in history if "loss" in h]
            return SimpleNamespace(training_loss=sum(losses) / len(losses) if losses else 0.0)
    return trainer.train(resume_from_checkpoint=resume_from)


def mlflow_callback(ctx, extra=None):
    """A TrainerCallback that sends every trainer log line to the stage's run, plus s/step."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def __init__(self):
            self.t0: float | None = None
            self.step0 = 0
            self.history: list[dict[str, Any]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.time()
            self.step0 = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if self.t0 is not None and state.global_step > self.step0:
                logs["s_per_step"] = (time.time() - self.t0) / (state.global_step - self.step0)
            if extra is not None:
                logs.update(extra())
            if "frac_reward_zero_std" in logs:  # GRPO: share of groups without learning signal
                logs["zero_variance_groups"] = logs["frac_reward_zero_std"]
            self.history.append({"step": state.global_step, **logs})
            ctx.log_metrics(logs, step=state.global_step)

        def seconds_per_step(self, final_step: int) -> float | None:
            if self.t0 is None or final_step <= self.step0:
                return None
            return (time.time() - self.t0) / (final_step - self.step0)

    return _Callback()


def save_final(trainer, processor, model_dir: Path, *, merge_lora: bool, extra: dict | None = None):
    """Save the trained model (LoRA merged when asked) + processor atomically; main process only."""
    from .models import is_peft_model, merge_adapter, save_model

    model = trainer.model
    if hasattr(trainer, "accelerator"):
        model = trainer.accelerator.unwrap_model(model)
        if not trainer.accelerator.is_main_process:
            return model_dir
    if is_peft_model(model) and merge_lora:
        model = merge_adapter(model)
    model.config.use_cache = True
    return save_model(model, processor, model_dir, extra_files=extra)


def plot_history(history: list[dict[str, Any]], keys: list[str], title: str):
    """A matplotlib figure of logged values over steps (None when nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(k in h for h in history)]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 1, figsize=(6, 2.2 * len(present)), squeeze=False)
    for ax, key in zip(axes[:, 0], present, strict=True):
        pts = [(h["step"], h[key]) for h in history if key in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
