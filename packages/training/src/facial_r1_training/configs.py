"""Typed stage configs for the ``model``, ``sft`` and ``grpo`` profile sections.

Built with :func:`facial_r1_core.config.from_section`, which rejects unknown keys. Every key is
documented in ``configs/README.md``; defaults here are the tiny-cpu values.

>>> from facial_r1_core.config import from_section
>>> from_section(SFTStageConfig, {"max_steps": 5}, name="sft").max_steps
5
>>> from_section(GRPOStageConfig, {"reward_weights": {"au": 2}}, name="grpo").weights()
[2.0, 1.0, 1.0]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from facial_r1_core.config import ConfigError, checked

REWARD_NAMES: tuple[str, ...] = ("au", "accuracy", "format")


@dataclass
class ModelStageConfig:
    """``model``: which model every stage starts from and how it is loaded."""

    path: str = "runs/model/tiny"  # folder written by `model build-tiny`, or a hub id (GPU)
    dtype: str = "float32"  # auto | float32 | bfloat16 | float16
    attn_implementation: str | None = None  # e.g. flash_attention_2 on GPU; None = default
    min_pixels: int | None = checked(None, ge=1)  # processor image limits (real models)
    max_pixels: int | None = checked(None, ge=1)
    use_lora: bool = False
    lora_r: int = checked(16, ge=1)
    lora_alpha: int = checked(32, ge=1)
    lora_dropout: float = checked(0.05, ge=0, le=1)
    lora_target_modules: list[str] | str = "all-linear"
    quantization: str | None = None  # 4bit | 8bit (QLoRA; GPU + bitsandbytes)
    merge_lora: bool = True  # merge the adapter into the saved final model
    tiny: dict[str, Any] = field(default_factory=dict)  # TinyModelSpec overrides for build-tiny

    def lora_settings(self):
        from .models import LoraSettings

        if not self.use_lora:
            return None
        return LoraSettings(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
        )

    def tiny_spec(self):
        from facial_r1_core.config import from_section

        from .models import TinyModelSpec

        return from_section(TinyModelSpec, self.tiny, name="model.tiny")


@dataclass
class TrainerCommon:
    """Keys shared by the SFT and GRPO sections (passed on to the TRL config)."""

    base_model: str | None = None  # None: model.path
    train_file: list[str] | str = field(default_factory=list)  # unified JSONL file(s)
    output_dir: str = "runs/sft"  # checkpoints/ and model/ go here
    model_dir: str | None = None  # final model folder (default: <output_dir>/model)
    emotions: list[str] = field(
        default_factory=lambda: [
            "anger",
            "disgust",
            "fear",
            "happiness",
            "neutral",
            "sadness",
            "surprise",
            "contempt",
        ]
    )
    question: str | None = None  # None: each record's own question
    max_samples: int | None = checked(None, ge=1)  # cap on training records (after rejection)
    max_steps: int | None = checked(1000, ge=1)  # null: num_train_epochs
    num_train_epochs: float = checked(1.0, gt=0)
    per_device_train_batch_size: int = checked(16, ge=1)
    gradient_accumulation_steps: int = checked(1, ge=1)
    learning_rate: float = checked(1e-3, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = checked(50, ge=0)
    weight_decay: float = checked(0.0, ge=0)
    max_grad_norm: float = checked(1.0, gt=0)
    logging_steps: int = checked(10, ge=1)
    save_steps: int = checked(500, ge=1)
    save_total_limit: int | None = checked(2, ge=1)
    resume: bool = True  # resume from the last checkpoint in <output_dir>/checkpoints
    use_cpu: bool = True
    bf16: bool = False
    fp16: bool = False
    activation_checkpointing: bool = False
    dataloader_num_workers: int = checked(0, ge=0)
    deepspeed: str | None = None  # DeepSpeed JSON (GPU profile)
    accelerate_config: str | None = None  # the launcher's config file (informational)
    seed: int | None = checked(None, ge=0)  # None: run.seed
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # extra TRL config fields

    def train_files(self) -> list[str]:
        files = [self.train_file] if isinstance(self.train_file, str) else list(self.train_file)
        return [f for f in files if f]


@dataclass
class SFTStageConfig(TrainerCommon):
    """``sft``: supervised fine-tuning on unified JSONL whose ``description`` is the completion."""

    # share of prompts with the ground-truth block (synthesis needs it)
    hint_fraction: float = checked(0.33, ge=0, le=1)
    max_length: int | None = checked(1024, ge=1)
    plain_loss: bool = True  # full-logits loss (CPU, small vocab); false: TRL's fused LM head

    def __post_init__(self) -> None:
        if not 0.0 <= self.hint_fraction <= 1.0:
            raise ConfigError(f"sft.hint_fraction must be in [0, 1], got {self.hint_fraction}")


@dataclass
class GRPOStageConfig(TrainerCommon):
    """``grpo``: GRPO with the core rewards on unified JSONL (labels and AUs as reward columns)."""

    output_dir: str = "runs/grpo"
    base_model: str | None = None  # None: the SFT model (sft.model_dir or <sft.output_dir>/model)
    reward_variant: str = "paper"  # paper | reference
    reward_weights: dict[str, float] = field(default_factory=dict)  # au/accuracy/format -> weight
    num_generations: int = checked(4, ge=2)  # G
    beta: float = checked(0.04, ge=0)  # KL coefficient
    epsilon: float = checked(0.2, ge=0)  # clipping
    epsilon_high: float | None = checked(None, ge=0)
    loss_type: str = "grpo"  # the paper's per-sequence normalisation; TRL default is dapo
    scale_rewards: str = "group"
    max_completion_length: int = checked(96, ge=1)
    temperature: float = checked(1.0, gt=0)
    top_p: float = checked(1.0, gt=0, le=1)
    num_iterations: int = checked(1, ge=1)
    max_steps: int | None = checked(20, ge=1)
    per_device_train_batch_size: int = checked(8, ge=1)
    learning_rate: float = checked(1e-5, gt=0)
    warmup_steps: int = checked(0, ge=0)
    logging_steps: int = checked(1, ge=1)
    save_steps: int = checked(10, ge=1)
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_gpu_memory_utilization: float = checked(0.3, gt=0, le=1)
    vllm_tensor_parallel_size: int = checked(1, ge=1)
    vllm_enable_sleep_mode: bool = False
    # vllm_mode server: generation on a separate vLLM server (`trl vllm-serve`; on Kubernetes its
    # own pod and GPUs, rendered by facial_r1_pipeline.k8s.vllm_server_objects, whose Service name
    # the runner sets here); the trainer reaches it over HTTP and sends weights over NCCL
    vllm_server_host: str = ""
    vllm_server_port: int = checked(8000, ge=1, le=65535)
    vllm_server_timeout: float = checked(240.0, gt=0)  # seconds to wait for the server
    vllm_group_port: int = checked(51216, ge=1024, le=65535)  # weight-sync group (trainer side)
    log_completions: bool = False
    log_model: bool = True  # log the final model to MLflow as a pyfunc (what the registry holds)
    rollout_engine: str = "trl"  # trl (model.generate / vLLM) | continuous (our decoder)
    rollout_batch_size: int = 64  # continuous: rows decoding together
    heldout_size: int = 64  # records kept out of training for the before/after reward check
    noop_kl_threshold: float = 1e-3  # mean KL below this: warn and tag the run grpo_noop=true
    track_weight_change: bool = True  # keep a CPU copy of the weights for the relative change

    def __post_init__(self) -> None:
        if self.rollout_engine not in ("trl", "continuous"):
            raise ConfigError(
                f"grpo.rollout_engine must be trl or continuous, got {self.rollout_engine!r}"
            )
        if self.rollout_engine == "continuous" and (self.use_vllm or self.top_p != 1.0):
            raise ConfigError(
                "grpo.rollout_engine=continuous samples on the trained model with top_p 1: "
                "set use_vllm false and top_p 1.0 (or rollout_engine trl)"
            )
        if self.reward_variant not in ("paper", "reference"):
            raise ConfigError(
                f"grpo.reward_variant must be paper or reference, got {self.reward_variant!r}"
            )
        unknown = sorted(set(self.reward_weights) - set(REWARD_NAMES))
        if unknown:
            raise ConfigError(
                f"grpo.reward_weights: unknown reward(s) {', '.join(unknown)}; "
                f"known: {', '.join(REWARD_NAMES)}"
            )
        if self.num_generations < 2:
            raise ConfigError("grpo.num_generations must be >= 2 (advantages need a group)")
        if self.vllm_mode not in ("colocate", "server"):
            raise ConfigError(f"grpo.vllm_mode must be colocate or server, got {self.vllm_mode!r}")

    def weights(self) -> list[float]:
        """Weights in the order of ``rewards.reward_functions``: au, accuracy, format."""
        return [float(self.reward_weights.get(name, 1.0)) for name in REWARD_NAMES]


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclass
class ServingSection:
    """The optional ``serving`` section: settings stored in a logged model's ``model_config``
    (documented in configs/README.md#serving-optional)."""

    question: str | None = None
    emotions: list[str] | None = None
    max_new_tokens: int | None = checked(None, ge=1)
    batch_size: int = checked(16, ge=1)
    max_image_bytes: int = checked(8 * 1024 * 1024, ge=1)
    max_image_pixels: int = checked(4096 * 4096, ge=1)
    max_rows: int = checked(64, ge=1)
