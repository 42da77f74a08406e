"""``facial-r1 evaluate``: batched greedy generation on a test JSONL and the core metrics.

Metrics (all from :mod:`facial_r1_core.metrics`, via the one parser): format rate, emotion
accuracy overall and per class with the confusion matrix, AU F1 micro/macro/per AU (optionally on
the BP4D or DISFA protocol subset), ROUGE-L of the reasoning against the reference description
when the test set has descriptions, and the optional LLM judge (failures reported as failures).

Outputs in ``evaluate.output_dir``: ``predictions.jsonl``, ``report.json``, ``report.md``,
``confusion.png``, ``au_f1.png``; all logged to the stage's MLflow run. Records whose image is
missing or undecodable are skipped with their reason and counted (``skipped``), never a crash:
``read == evaluated + skipped``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facial_r1_core.config import checked
from facial_r1_core.schema import Record, atomic_write, iter_records_lenient

from .generation import GenerationBackend, GenerationRequest, load_image


@dataclass
class EvaluateConfig:
    """The ``evaluate`` section of a profile (documented in configs/README.md)."""

    model_path: str = ""
    test_file: str = ""
    output_dir: str = "runs/evaluate"
    backend: str = "transformers"
    batch_size: int = checked(32, ge=1)
    max_new_tokens: int = checked(96, ge=1)
    emotions: list[str] | None = None
    au_subset: str | None = None
    limit: int = checked(0, ge=0)
    judge: dict[str, Any] = field(default_factory=dict)
    vllm: dict[str, Any] = field(default_factory=dict)


def _single(labels) -> str | None:
    return labels[0] if len(labels) == 1 else None


def _reasoning(text: str) -> str:
    from facial_r1_core.parser import parse_completion

    parsed = parse_completion(text or "")
    return parsed.think if parsed.think is not None else (text or "")


def load_test_set(path: Path, limit: int = 0) -> tuple[list[tuple[Record, Any]], list[dict]]:
    """(record, image) pairs ready to evaluate, and the skipped lines with their reasons."""
    root = path.parent
    ready: list[tuple[Record, Any]] = []
    skipped: list[dict[str, Any]] = []
    for count, result in enumerate(iter_records_lenient(path), start=1):
        if limit and count > limit:
            break
        if result.record is None:
            skipped.append({"line": result.line, "reason": f"bad record: {result.error}"})
            continue
        rec = result.record
        img_path = rec.image_path(root)
        if not img_path.is_file():
            skipped.append(
                {"line": result.line, "id": rec.id, "reason": f"image missing: {img_path}"}
            )
            continue
        try:
            image = load_image(img_path)
        except Exception as exc:
            skipped.append(
                {
                    "line": result.line,
                    "id": rec.id,
                    "reason": f"image undecodable: {img_path}: {exc}",
                }
            )
            continue
        ready.append((rec, image))
    return ready, skipped


def compute_metrics(
    records: list[Record],
    completions: list[str],
    emotions: list[str],
    au_subset: str | None = None,
) -> dict[str, Any]:
    """The report body: every metric, from records and their completions."""
    from facial_r1_core.metrics import au_metrics, emotion_metrics, rouge_l
    from facial_r1_core.parser import parse_completion

    parsed = [parse_completion(c) for c in completions]
    n = len(records)
    report: dict[str, Any] = {"n": n}
    report["format_rate"] = sum(p.format_valid for p in parsed) / n if n else 0.0
    report["negative_wording_rate"] = sum(p.negative_wording for p in parsed) / n if n else 0.0
    emo_idx = [i for i, r in enumerate(records) if _single(r.labels)]
    classes = list(dict.fromkeys([*emotions, *(records[i].labels[0] for i in emo_idx)]))
    report["emotion"] = emotion_metrics(
        [records[i].labels[0] for i in emo_idx],
        [_single(parsed[i].emotions) for i in emo_idx],
        classes=classes,
    )
    au_idx = [i for i, r in enumerate(records) if r.AUs]
    report["au"] = au_metrics(
        [set(records[i].AUs) for i in au_idx],
        [set(parsed[i].aus) for i in au_idx],
        subset=au_subset,
    )
    ref_idx = [i for i, r in enumerate(records) if r.description.strip()]
    if ref_idx:
        report["rouge_l"] = rouge_l(
            [_reasoning(completions[i]) for i in ref_idx],
            [_reasoning(records[i].description) for i in ref_idx],
        )
        report["rouge_l_n"] = len(ref_idx)
    return report


def headline(report: dict[str, Any]) -> dict[str, float]:
    """The flat numbers logged as metrics and printed by ``make pipeline``."""
    out = {
        "n": report["n"],
        "format_rate": report["format_rate"],
        "emotion_accuracy": report["emotion"]["accuracy"],
        "emotion_n": report["emotion"]["n"],
        "au_f1_micro": report["au"]["micro_f1"],
        "au_f1_macro": report["au"]["macro_f1"],
        "au_n": report["au"]["n"],
        "negative_wording_rate": report["negative_wording_rate"],
    }
    for key in (
        "rouge_l",
        "skipped",
        "images_per_s",
        "judge_score_mean",
        "judge_ok",
        "judge_failed",
    ):
        if key in report:
            out[key] = report[key]
    return {k: round(float(v), 4) for k, v in out.items()}


def markdown_report(report: dict[str, Any], title: str = "Facial-R1 evaluation") -> str:
    """A readable summary of the report."""
    h = headline(report)
    lines = [
        f"# {title}",
        "",
        f"Model: `{report.get('model', '')}`  ",
        f"Test set: `{report.get('test_file', '')}`",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:g} |" for k, v in h.items()]
    emo = report["emotion"]
    lines += [
        "",
        "## Emotion accuracy per class",
        "",
        "| class | accuracy | support |",
        "|---|---|---|",
    ]
    for i, cls in enumerate(emo["classes"][:-1]):
        support = sum(emo["confusion"][i])
        if support:
            lines.append(f"| {cls} | {emo['per_class'][cls]:.3f} | {support} |")
    lines += [
        "",
        "## AU F1 per AU",
        "",
        "| AU | F1 | precision | recall | support |",
        "|---|---|---|---|---|",
    ]
    for au, v in report["au"]["per_au"].items():
        lines.append(
            f"| {au} | {v['f1']:.3f} | {v['precision']:.3f} | {v['recall']:.3f} | {v['support']} |"
        )
    if report.get("skipped_lines"):
        lines += ["", "## Skipped records", ""]
        lines += [f"- line {s['line']}: {s['reason']}" for s in report["skipped_lines"][:50]]
    if report.get("judge_errors"):
        lines += ["", "## Judge failures (not scored)", ""]
        lines += [f"- {e}" for e in report["judge_errors"][:20]]
    return "\n".join(lines) + "\n"


def plot_confusion(report: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    emo = report["emotion"]
    rows = emo["classes"][:-1]
    matrix = emo["confusion"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(emo["classes"]), 1.0 + 0.6 * len(rows)))
    ax.imshow(matrix if matrix else [[0]], cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(emo["classes"])), emo["classes"], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    top = max((max(r) for r in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value:
                ax.text(
                    j,
                    i,
                    str(value),
                    ha="center",
                    va="center",
                    color="white" if value > top / 2 else "black",
                    fontsize=8,
                )
    ax.set_title(f"emotion confusion (accuracy {emo['accuracy']:.2f}, n={emo['n']})")
    fig.tight_layout()
    return fig


def plot_au_f1(report: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_au = {k: v for k, v in report["au"]["per_au"].items() if v["support"] > 0}
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(per_au) + 1.5), 3.2))
    ax.bar(list(per_au), [v["f1"] for v in per_au.values()], color="#4a7fb5")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.tick_params(axis="x", rotation=60)
    ax.set_title(
        f"AU F1 (micro {report['au']['micro_f1']:.2f}, macro {report['au']['macro_f1']:.2f})"
    )
    fig.tight_layout()
    return fig


def evaluate(
    cfg: EvaluateConfig,
    backend: GenerationBackend,
    *,
    emotions: list[str],
    output_dir: Path,
    test_file: Path,
    model_id: str = "",
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Generate, score, write the report files; returns (report, output paths)."""
    from facial_r1_core.prompts import sft_prompt

    ready, skipped = load_test_set(test_file, cfg.limit)
    records = [r for r, _ in ready]
    requests = [
        GenerationRequest(prompt=sft_prompt(r.question, emotions), image=img, temperature=0.0)
        for r, img in ready
    ]
    start = time.perf_counter()
    completions: list[str] = []
    chunks = [
        requests[i : i + backend.batch_size] for i in range(0, len(requests), backend.batch_size)
    ]
    if progress and len(chunks) > 1:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="evaluate", unit="batch")
    for chunk in chunks:
        completions.extend(backend.generate(chunk))
    elapsed = time.perf_counter() - start
    report = compute_metrics(records, completions, emotions, cfg.au_subset)
    report.update(
        model=model_id,
        test_file=str(test_file),
        read=len(ready) + len(skipped),
        skipped=len(skipped),
        skipped_lines=skipped,
        generation_s=round(elapsed, 3),
        images_per_s=round(len(records) / elapsed, 3) if elapsed > 0 else 0.0,
    )
    if cfg.judge and cfg.judge.get("enabled"):
        from facial_r1_core.config import from_section

        from . import judge

        jcfg = from_section(judge.JudgeConfig, cfg.judge, name="evaluate.judge")
        idx = [i for i, r in enumerate(records) if r.description.strip()]
        if not idx:
            report["judge_errors"] = ["no reference descriptions in the test set"]
        else:
            try:
                results = judge.judge_pairs(
                    jcfg,
                    [_reasoning(completions[i]) for i in idx],
                    [_reasoning(records[i].description) for i in idx],
                )
            except ValueError as exc:  # no endpoint configured: a failure, not a zero
                results = []
                report["judge_errors"] = [str(exc)]
            if results:
                report.update(judge.summarize(results))
            report.setdefault("judge_errors", [r.error for r in results if r.error])
    output_dir.mkdir(parents=True, exist_ok=True)
    preds = output_dir / "predictions.jsonl"
    with atomic_write(preds) as handle:
        from facial_r1_core.parser import parse_completion

        for rec, text in zip(records, completions, strict=True):
            p = parse_completion(text)
            handle.write(
                json.dumps(
                    {
                        "id": rec.id,
                        "image": f"{rec.dataset}/{rec.image}",
                        "AUs": rec.AUs,
                        "labels": rec.labels,
                        "completion": text,
                        "pred_aus": list(p.aus),
                        "pred_emotions": list(p.emotions),
                        "format_valid": p.format_valid,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    report_json = output_dir / "report.json"
    with atomic_write(report_json) as handle:
        json.dump({"headline": headline(report), **report}, handle, indent=2)
    report_md = output_dir / "report.md"
    with atomic_write(report_md) as handle:
        handle.write(markdown_report(report))
    import matplotlib.pyplot as plt

    outputs = {"predictions": str(preds), "report": str(report_json), "report_md": str(report_md)}
    for name, plot in (("confusion", plot_confusion), ("au_f1", plot_au_f1)):
        fig = plot(report)
        path = output_dir / f"{name}.png"
        with atomic_write(path, "wb", encoding=None) as handle:
            fig.savefig(handle, format="png", dpi=110)
        plt.close(fig)
        outputs[name] = str(path)
    return report, outputs


# --------------------------------------------------------------------------------------------
# the command


def add_parser(subparsers) -> None:
    from .stage import add_stage_arguments

    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model on a test JSONL: emotion accuracy, AU F1, format, ROUGE-L",
        description=(
            "Batched greedy generation on a test JSONL with the inference prompt; core metrics "
            "(emotion accuracy per class and confusion, AU F1 micro/macro/per AU, ROUGE-L when "
            "descriptions exist, format rate), optional LLM judge; report JSON + Markdown and "
            "plots, logged to MLflow."
        ),
    )
    parser.add_argument("--model", help="model folder, hub id or models:/NAME@ALIAS")
    parser.add_argument("--test-file", help="test JSONL (overrides evaluate.test_file)")
    parser.add_argument("--output-dir", help="report folder (overrides evaluate.output_dir)")
    parser.add_argument("--limit", type=int, help="at most N test records")
    add_stage_arguments(parser)
    parser.set_defaults(func=main)


def main(args) -> int:
    from .stage import run_stage

    return run_stage(
        args, stage="evaluate", section="evaluate", config_cls=EvaluateConfig, body=_body
    )


def _body(ctx) -> tuple[dict[str, Any], dict[str, Any]]:
    from .analyze import resolve_model
    from .generation import create_backend
    from .synthesis import prompt_emotions

    cfg: EvaluateConfig = ctx.config
    args = ctx.args
    for flag, name in (
        ("model", "model_path"),
        ("test_file", "test_file"),
        ("output_dir", "output_dir"),
        ("limit", "limit"),
    ):
        value = getattr(args, flag, None) if args is not None else None
        if value is not None:
            setattr(cfg, name, value)
    if not cfg.model_path:
        raise ValueError("evaluate.model_path is not set (or pass --model)")
    if not cfg.test_file:
        raise ValueError("evaluate.test_file is not set (or pass --test-file)")
    test_file = ctx.path(cfg.test_file)
    if not test_file.is_file():
        raise FileNotFoundError(f"test file not found: {test_file}")
    model_path = resolve_model(cfg.model_path, ctx.profile, resolve=ctx.path)
    backend = create_backend(
        cfg.backend,
        model_path,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        seed=ctx.seed,
        vllm_options=cfg.vllm,
    )
    report, outputs = evaluate(
        cfg,
        backend,
        emotions=prompt_emotions(cfg.emotions),
        output_dir=ctx.path(cfg.output_dir),
        test_file=test_file,
        model_id=str(cfg.model_path),
    )
    for name in ("report", "report_md", "predictions", "confusion", "au_f1"):
        ctx.log_artifact(outputs[name], "evaluation")
    metrics = headline(report)
    emo = report["emotion"]
    for i, cls in enumerate(emo["classes"][:-1]):
        if sum(emo["confusion"][i]):
            metrics[f"emotion_acc_{cls}"] = emo["per_class"][cls]
    for au, v in report["au"]["per_au"].items():
        if v["support"]:
            metrics[f"au_f1_{au}"] = v["f1"]
    return outputs, metrics
