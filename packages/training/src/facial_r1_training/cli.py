"""Training-side ``facial-r1`` commands: model, sft, grpo, synthesize, filter, evaluate, analyze.

``model``, ``sft`` and ``grpo`` are defined here. Other commands live in their own modules, each
with ``add_parser(subparsers)`` (listed in :data:`COMMAND_MODULES`; a module that is missing or
lacks ``add_parser`` is an error, never skipped). Handlers import torch/transformers/trl lazily so
``facial-r1 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib

from facial_r1_core.cli import deprecated_flag
from facial_r1_core.schema import add_skip_bad_records_argument

from .stage import add_stage_arguments

# module name -> adds its own stage command(s) through add_parser(subparsers)
COMMAND_MODULES: tuple[str, ...] = (
    "synthesis",
    "filtering",
    "evaluation",
    "analyze",
)


def register(subparsers) -> None:
    """Add the training stage commands to the ``facial-r1`` parser."""
    _add_model(subparsers)
    _add_sft(subparsers)
    _add_grpo(subparsers)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
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
        "AutoProcessor). Output: model.path, or --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    build.add_argument("--output-dir", metavar="DIR", help="output folder (overrides model.path)")
    deprecated_flag(build, "--out", dest="output_dir", new="--output-dir")
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
    merge.add_argument("--output-dir", metavar="DIR", help="(required) output model folder")
    deprecated_flag(merge, "--out", dest="output_dir", new="--output-dir", required=True)
    merge.add_argument("--dtype", default="auto", help="dtype to load the base in")
    merge.set_defaults(func=_run_merge_lora)
    logm = verbs.add_parser(
        "log",
        help="log a model folder to MLflow as a pyfunc model (what the registry holds)",
        description="Log a Hugging Face model folder (e.g. a stage's final model) to the MLflow "
        "artifact store as an MLflow pyfunc model: the folder is copied into the model's "
        "artifacts, so the logged model loads anywhere (mlflow.pyfunc.load_model, `mlflow models "
        "serve`, `facial-r1 analyze --model`). The GRPO stage does this itself (grpo.log_model); "
        "use this verb for other folders. Outputs: logged_model (models:/<model_id>), which "
        "`--register NAME` also registers. The serving limits come from the profile's `serving` "
        "section (see configs/README.md).",
    )
    logm.add_argument("folder", metavar="MODEL_DIR", help="Hugging Face model folder")
    logm.add_argument(
        "--register", metavar="NAME", help="also register it as a new version of NAME"
    )
    add_stage_arguments(logm)
    logm.set_defaults(func=_run_log_model)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _run_log_model(args) -> int:
    from .stage import run_stage

    def body(ctx):
        from .mlflow_model import log_candidate

        if not ctx.mlflow_run_id:
            raise ValueError("`facial-r1 model log` needs MLflow (drop --no-mlflow)")
        logged = log_candidate(ctx, ctx.path(args.folder))
        outputs = dict(logged["outputs"])
        if args.register:
            import mlflow

            version = mlflow.register_model(outputs["logged_model"], args.register)
            outputs["registered_version"] = f"models:/{args.register}/{version.version}"
        return outputs, logged["metrics"]

    return run_stage(args, stage="model-log", section="", body=body)


def _run_build_tiny(args) -> int:
    from .configs import ModelStageConfig
    from .stage import run_stage

    def body(ctx):
        from .models import build_tiny

        cfg: ModelStageConfig = ctx.config
        out = ctx.path(cfg.path)
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
        args,
        stage="model-build-tiny",
        section="model",
        config_cls=ModelStageConfig,
        body=body,
        flags={"path": args.output_dir},
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
    out = save_merged(model, processor, args.output_dir)
    print(out)
    return 0


def _training_flags(parser: argparse.ArgumentParser, section: str) -> None:
    parser.add_argument(
        "--input",
        action="append",
        metavar="JSONL",
        help=f"unified JSONL to train on, repeatable (overrides {section}.train_file)",
    )
    deprecated_flag(parser, "--train-file", dest="input", new="--input", append=True)
    parser.add_argument(
        "--model", metavar="DIR_OR_ID", help=f"starting model (overrides {section}.base_model)"
    )
    deprecated_flag(parser, "--base-model", dest="model", new="--model")
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        help=f"checkpoints and final model (overrides {section}.output_dir)",
    )
    parser.add_argument("--max-steps", type=int, help=f"overrides {section}.max_steps")
    add_skip_bad_records_argument(parser)
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


def _training_config_flags(args) -> dict:
    """The section keys the sft/grpo flags set (None = flag not given)."""
    return {
        "train_file": list(args.input) if args.input else None,
        "base_model": args.model,
        "output_dir": args.output_dir,
        "max_steps": args.max_steps,
        "resume": False if args.fresh else None,
    }


def _check_train_files(ctx) -> None:
    from .data import check_inputs

    files = [ctx.path(f) for f in ctx.config.train_files()]
    check_inputs(ctx, [f for f in files if f.is_file()])


def _run_sft(args) -> int:
    from .configs import SFTStageConfig
    from .stage import run_stage

    def body(ctx):
        _check_train_files(ctx)  # bad records stop the stage before trl is even imported
        from .sft import run_sft

        return run_sft(ctx)

    return run_stage(
        args,
        stage="sft",
        section="sft",
        config_cls=SFTStageConfig,
        body=body,
        flags=_training_config_flags(args),
    )


def _run_grpo(args) -> int:
    from .configs import GRPOStageConfig
    from .stage import run_stage

    def body(ctx):
        _check_train_files(ctx)
        from .grpo import run_grpo

        return run_grpo(ctx)

    return run_stage(
        args,
        stage="grpo",
        section="grpo",
        config_cls=GRPOStageConfig,
        body=body,
        flags=_training_config_flags(args),
    )
