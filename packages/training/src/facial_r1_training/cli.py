"""Training-side ``facial-r1`` commands: model, sft, grpo, synthesize, filter, evaluate, analyze.

``model``, ``sft`` and ``grpo`` are defined here. Other stages live in their own modules, each
with ``add_parser(subparsers)`` (listed in :data:`COMMAND_MODULES`; a module not written yet is
skipped). Handlers import torch/transformers/trl lazily so ``facial-r1 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib

from .stage import add_stage_arguments

# module name -> adds its own stage command(s) through add_parser(subparsers)
COMMAND_MODULES: tuple[str, ...] = (
    "synthesis",
    "filtering",
    "evaluation",
    "evaluate",
    "analyze",
)


def register(subparsers) -> None:
    """Add the training stage commands to the ``facial-r1`` parser."""
    _add_model(subparsers)
    _add_sft(subparsers)
    _add_grpo(subparsers)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue  # stage not built yet
            raise
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)


def _add_model(subparsers) -> None:
    parser = subparsers.add_parser(
        "model",
        help="build the tiny offline Qwen2.5-VL; merge LoRA adapters",
        description="Model utilities. `build-tiny` writes the tiny Qwen2.5-VL stand-in used by the "
        "tiny-cpu profile; `merge-lora` folds a LoRA adapter into its base model.",
    )
    verbs = parser.add_subparsers(dest="model_command", metavar="VERB")
    build = verbs.add_parser(
        "build-tiny",
        help="write a random-init ~400k-parameter Qwen2.5-VL + offline tokenizer + processor",
        description="Build the tiny Qwen2.5-VL (random init from a config; sizes in model.tiny) "
        "with a byte-level BPE tokenizer trained offline on the project's prompt/AU/emotion text "
        "and an image-only processor (56x56 images -> 4 image tokens). The folder loads with "
        "from_pretrained(DIR) under HF_HUB_OFFLINE=1 (import facial_r1_training first for "
        "AutoProcessor). Output: model.path, or --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    build.add_argument("--out", metavar="DIR", help="output folder (default: model.path)")
    build.add_argument(
        "--corpus",
        metavar="JSONL",
        action="append",
        default=[],
        help="also train the tokenizer on these records' descriptions (repeatable)",
    )
    add_stage_arguments(build)
    build.set_defaults(func=_run_build_tiny)

    merge = verbs.add_parser(
        "merge-lora",
        help="merge a LoRA adapter folder into its base model and save a standalone model",
    )
    merge.add_argument("adapter", metavar="ADAPTER_DIR", help="folder with adapter_config.json")
    merge.add_argument("--out", metavar="DIR", required=True, help="output model folder")
    merge.add_argument("--dtype", default="auto", help="dtype to load the base in")
    merge.set_defaults(func=_run_merge_lora)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _run_build_tiny(args) -> int:
    from .configs import ModelStageConfig
    from .stage import run_stage

    def body(ctx):
        from .models import build_tiny

        cfg: ModelStageConfig = ctx.config
        out = ctx.path(args.out or cfg.path)
        extra = _corpus_texts([ctx.path(p) for p in args.corpus])
        summary = build_tiny(out, cfg.tiny_spec(), extra_texts=extra)
        ctx.log_dict(summary, "model/summary.json")
        metrics = {
            "parameters": summary["parameters"],
            "vocab_size": summary["vocab_size"],
            "prompt_tokens": summary["prompt_tokens"],
            "image_tokens": summary["image_tokens"],
        }
        return {"model": str(out)}, metrics

    return run_stage(
        args, stage="model-build-tiny", section="model", config_cls=ModelStageConfig, body=body
    )


def _corpus_texts(paths) -> list[str]:
    from facial_r1_core.schema import iter_records_lenient

    texts = []
    for path in paths:
        for item in iter_records_lenient(path):
            if item.record is not None and item.record.description:
                texts.append(item.record.description)
    return texts


def _run_merge_lora(args) -> int:
    from .models import load_model_and_processor, save_merged

    model, processor = load_model_and_processor(args.adapter, dtype=args.dtype)
    out = save_merged(model, processor, args.out)
    print(out)
    return 0


def _training_flags(parser: argparse.ArgumentParser, section: str) -> None:
    parser.add_argument(
        "--train-file",
        action="append",
        metavar="JSONL",
        help=f"unified JSONL to train on, repeatable (overrides {section}.train_file)",
    )
    parser.add_argument(
        "--base-model", metavar="DIR_OR_ID", help=f"starting model (overrides {section}.base_model)"
    )
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        help=f"checkpoints and final model (overrides {section}.output_dir)",
    )
    parser.add_argument("--max-steps", type=int, help=f"overrides {section}.max_steps")
    add_stage_arguments(parser, resumable=True)


def _add_sft(subparsers) -> None:
    parser = subparsers.add_parser(
        "sft",
        help="stage 1: supervised fine-tuning (TRL SFTTrainer, loss on the completion only)",
        description="SFT on unified JSONL records whose description is the completion "
        "(<think>..</think><answer>..</answer>). Prompt = the paper's SFT prompt; a share "
        "sft.hint_fraction of prompts carries the ground-truth block so that the model learns to "
        "follow hints (the synthesis stage needs it). Records with an empty description or a "
        "missing/undecodable image are rejected with reasons. Checkpoints go to "
        "<output_dir>/checkpoints and training resumes from the last one; the final model + "
        "processor are written atomically to <output_dir>/model.",
    )
    _training_flags(parser, "sft")
    parser.set_defaults(func=_run_sft)


def _add_grpo(subparsers) -> None:
    parser = subparsers.add_parser(
        "grpo",
        help="stage 2: GRPO with the core rewards (TRL GRPOTrainer)",
        description="GRPO on unified JSONL records (AUs and labels feed the rewards: AU F1, "
        "emotion accuracy, format; variant paper|reference, weights in grpo.reward_weights). "
        "Logs reward components, KL, completion length and the share of zero-variance groups "
        "per step. Checkpoints and resume as for sft; final model in <output_dir>/model.",
    )
    _training_flags(parser, "grpo")
    parser.set_defaults(func=_run_grpo)


def _apply_flags(cfg, args) -> None:
    if getattr(args, "train_file", None):
        cfg.train_file = list(args.train_file)
    for flag in ("base_model", "output_dir", "max_steps"):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(cfg, flag, value)
    if getattr(args, "fresh", False):
        cfg.resume = False


def _run_sft(args) -> int:
    from .configs import SFTStageConfig
    from .stage import run_stage

    def body(ctx):
        from .sft import run_sft

        _apply_flags(ctx.config, args)
        ctx.revalidate()
        return run_sft(ctx)

    return run_stage(args, stage="sft", section="sft", config_cls=SFTStageConfig, body=body)


def _run_grpo(args) -> int:
    from .configs import GRPOStageConfig
    from .stage import run_stage

    def body(ctx):
        from .grpo import run_grpo

        _apply_flags(ctx.config, args)
        ctx.revalidate()
        return run_grpo(ctx)

    return run_stage(args, stage="grpo", section="grpo", config_cls=GRPOStageConfig, body=body)
