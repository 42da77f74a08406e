"""``facial-r1 data seed-sft``: the seed reasoning data of stage 1 (the paper's ~300 samples).

Reads a unified JSONL with ground-truth AUs and one emotion per record, picks ``count`` records
balanced over emotions (seeded), asks a teacher for a ``<think>...</think><answer>...</answer>``
completion and checks it with the core filter (:func:`facial_r1_core.filter.check`).

Teachers:

- ``template`` (default, offline): :mod:`facial_r1_data.teacher_template` writes the completion
  from the ground truth and the AU meanings table.
- ``openai``: :mod:`facial_r1_data.teacher_openai`, any OpenAI-compatible endpoint with the image
  attached; the prompt is the paper's SFT prompt plus the ground-truth block, and a rejected
  answer is retried with the reflective error block up to ``attempts`` times.

Outputs (paper layout, next to the input): ``<root>/<Dataset>_seed.jsonl`` (records whose
``description`` is the accepted completion) and ``<root>/<Dataset>_seed_rejected.jsonl``
(quarantine: the record with ``meta_info.rejected = {reasons, codes, attempts, completion}``).
Counts reconcile: ``read = eligible + ineligible`` and ``selected = accepted + rejected``.
Hints (ground-truth-conditioned prompts) are the SFT stage's business, so this output does not
depend on any hint fraction.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facial_r1_core.config import checked
from facial_r1_core.schema import (
    Record,
    aus_annotated,
    ensure_not_input,
    iter_records_lenient,
    write_jsonl,
)
from facial_r1_core.vocab import BASIC_EMOTIONS, EMOTIONS

log = logging.getLogger("facial_r1.data.seed")

TEACHERS = ("template", "openai")


@dataclass
class SeedConfig:
    """The ``seed_sft`` section of a profile (documented in configs/README.md)."""

    input: str = "data/DemoFaces_train.jsonl"
    output: str = ""  # default <root>/<Dataset>_seed.jsonl beside the input
    rejected: str = ""  # default <root>/<Dataset>_seed_rejected.jsonl
    count: int = checked(300, ge=0)
    teacher: str = "template"
    seed: int = 0
    verbosity: str = "short"  # template teacher: short | long
    emotions: list[str] = field(default_factory=list)  # allowed answers; default from the data
    attempts: int = checked(2, ge=1)  # openai teacher: tries per sample (with error block)
    base_url: str = ""  # openai teacher; FACIAL_R1_TEACHER_BASE_URL wins
    model: str = ""  # openai teacher; FACIAL_R1_TEACHER_MODEL wins
    timeout_s: float = checked(60.0, gt=0)
    max_retries: int = checked(5, ge=0)
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    requests_per_minute: float = checked(60.0, gt=0)
    concurrency: int = checked(4, ge=1)
    temperature: float = 0.7
    max_tokens: int = checked(512, ge=1)


@dataclass
class SeedReport:
    read: int = 0
    invalid: int = 0  # lines that are not valid records
    ineligible: int = 0  # valid records without exactly one emotion label
    eligible: int = 0
    selected: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    attempts: int = 0
    output: Path | None = None
    rejected_path: Path | None = None

    def metrics(self) -> dict[str, float]:
        out = {
            k: float(getattr(self, k))
            for k in (
                "read",
                "invalid",
                "ineligible",
                "eligible",
                "selected",
                "accepted",
                "rejected",
                "attempts",
            )
        }
        out["acceptance_rate"] = self.accepted / self.selected if self.selected else 0.0
        for code, n in self.reasons.items():
            out[f"rejected_{code}"] = float(n)
        return out


def select_balanced(records: Sequence[Record], count: int, seed: int) -> list[Record]:
    """Up to ``count`` records, round-robin over emotions, each emotion in a seeded order.

    >>> recs = [Record.create(dataset="D", image=f"{i}.png", question="q", labels=[e])
    ...         for i, e in enumerate(["anger"] * 5 + ["fear"] * 2)]
    >>> sorted(Counter(r.labels[0] for r in select_balanced(recs, 4, 0)).items())
    [('anger', 2), ('fear', 2)]
    """
    rng = random.Random(f"seed-select/{seed}")
    groups: dict[str, list[Record]] = {}
    for rec in records:
        groups.setdefault(rec.labels[0], []).append(rec)
    for items in groups.values():
        rng.shuffle(items)
    order = sorted(groups)
    chosen: list[Record] = []
    depth = 0
    while len(chosen) < count and any(depth < len(groups[e]) for e in order):
        for emotion in order:
            if depth < len(groups[emotion]) and len(chosen) < count:
                chosen.append(groups[emotion][depth])
        depth += 1
    return chosen


def check_image(path: Path) -> str | None:
    """None when the image exists and decodes, else the reason."""
    if not path.is_file():
        return f"image missing: {path}"
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
    except Exception as exc:
        return f"image undecodable: {path}: {type(exc).__name__}: {exc}"
    return None


def _filter():
    from facial_r1_core import filter as core_filter

    return core_filter


class _Job:
    """Produce an accepted or rejected row for one record."""

    def __init__(self, cfg: SeedConfig, root: Path, teacher, emotions: Sequence[str]):
        self.cfg, self.root, self.teacher, self.emotions = cfg, root, teacher, emotions

    def __call__(self, rec: Record) -> tuple[bool, dict[str, Any], int]:
        image = rec.image_path(self.root)
        problem = check_image(image)
        if problem:
            return False, _rejected(rec, [problem], ["bad_image"], 0, ""), 0
        check = _filter().check
        if self.teacher.name == "template":
            text = self.teacher.complete_record(rec)
            result = check(text, rec.AUs, rec.labels, aus_annotated=aus_annotated(rec))
            if result.accepted:
                return True, _accepted(rec, text, "template", 1), 1
            return False, _rejected(rec, result.reasons, result.codes, 1, text), 1
        from facial_r1_core.prompts import synthesis_prompt

        from .teacher_openai import TeacherError

        prev, errors, text = None, None, ""
        reasons: list[str] = []
        codes: list[str] = []
        attempts = 0
        for _ in range(max(1, self.cfg.attempts)):
            attempts += 1
            prompt = synthesis_prompt(
                rec.question,
                self.emotions,
                rec.AUs,
                rec.labels[0],
                prev_response=prev,
                errors=errors,
            )
            try:
                text = self.teacher.complete(prompt, image)
            except TeacherError as exc:
                return (
                    False,
                    _rejected(rec, [f"teacher error: {exc}"], ["teacher_error"], attempts, ""),
                    attempts,
                )
            result = check(text, rec.AUs, rec.labels, aus_annotated=aus_annotated(rec))
            if result.accepted:
                return True, _accepted(rec, text, self.teacher.settings.model, attempts), attempts
            reasons, codes = result.reasons, result.codes
            prev, errors = text, result.reasons
        return False, _rejected(rec, reasons, codes, attempts, text), attempts


def _accepted(rec: Record, text: str, teacher: str, attempts: int) -> dict[str, Any]:
    row = rec.to_dict()
    row["description"] = text
    row["meta_info"] = {**rec.meta_info, "seed_teacher": teacher, "seed_attempts": attempts}
    return row


def _rejected(
    rec: Record, reasons: list[str], codes: list[str], attempts: int, text: str
) -> dict[str, Any]:
    row = rec.to_dict()
    row["meta_info"] = {
        **rec.meta_info,
        "rejected": {
            "reasons": list(reasons),
            "codes": list(codes),
            "attempts": attempts,
            "completion": text,
        },
    }
    return row


def make_teacher(cfg: SeedConfig):
    if cfg.teacher == "template":
        from .teacher_template import TemplateTeacher

        return TemplateTeacher(seed=cfg.seed, verbosity=cfg.verbosity)
    if cfg.teacher == "openai":
        from .teacher_openai import OpenAISettings, OpenAITeacher

        settings = OpenAISettings.from_env(
            base_url=cfg.base_url,
            model=cfg.model,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s,
            backoff_max_s=cfg.backoff_max_s,
            requests_per_minute=cfg.requests_per_minute,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
        )
        return OpenAITeacher(settings)
    raise ValueError(f"seed_sft.teacher must be one of {', '.join(TEACHERS)}, got {cfg.teacher!r}")


def default_outputs(input_path: Path, dataset: str) -> tuple[Path, Path]:
    root = input_path.parent
    return root / f"{dataset}_seed.jsonl", root / f"{dataset}_seed_rejected.jsonl"


def build_seed(
    cfg: SeedConfig,
    input_path: Path,
    *,
    output: Path | None = None,
    rejected: Path | None = None,
    teacher=None,
    progress: bool = True,
) -> SeedReport:
    """Run the teacher over a balanced selection and write the accepted and rejected files."""
    if cfg.count < 0:
        raise ValueError("seed_sft.count must be >= 0")
    if not input_path.is_file():
        raise FileNotFoundError(f"seed_sft.input: no such file: {input_path}")
    report = SeedReport()
    eligible: list[Record] = []
    for line in iter_records_lenient(input_path):
        report.read += 1
        if line.error is not None:
            report.invalid += 1
            log.warning("skipping %s", line.error)
            continue
        rec = line.record
        if rec is None or len(rec.labels) != 1:
            report.ineligible += 1
            continue
        eligible.append(rec)
    report.eligible = len(eligible)
    datasets = sorted({r.dataset for r in eligible}) or ["Seed"]
    dataset = datasets[0] if len(datasets) == 1 else "Mixed"
    default_out, default_rej = default_outputs(input_path, dataset)
    output = output or default_out
    rejected = rejected or default_rej
    ensure_not_input([output, rejected], [input_path], "seed")
    labels_seen = {r.labels[0] for r in eligible}
    emotions = cfg.emotions or list(EMOTIONS if "contempt" in labels_seen else BASIC_EMOTIONS)
    chosen = select_balanced(eligible, cfg.count, cfg.seed)
    report.selected = len(chosen)
    teacher = teacher or make_teacher(cfg)
    job = _Job(cfg, input_path.parent, teacher, emotions)
    accepted_rows: list[dict[str, Any]] = []
    rejected_rows: list[dict[str, Any]] = []
    from tqdm import tqdm

    workers = max(1, cfg.concurrency) if teacher.name != "template" else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(job, chosen)
        for ok, row, attempts in tqdm(
            results,
            total=len(chosen),
            desc=f"seed ({teacher.name})",
            unit="sample",
            disable=not progress,
            mininterval=0.5,
        ):
            report.attempts += attempts
            if ok:
                accepted_rows.append(row)
            else:
                rejected_rows.append(row)
                report.reasons.update(row["meta_info"]["rejected"]["codes"])
    report.accepted, report.rejected = len(accepted_rows), len(rejected_rows)
    assert report.accepted + report.rejected == report.selected
    assert report.eligible + report.ineligible + report.invalid == report.read
    write_jsonl(output, accepted_rows)
    write_jsonl(rejected, rejected_rows)
    report.output, report.rejected_path = output, rejected
    return report


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers) -> None:
    from facial_r1_core.cli import positional_input
    from facial_r1_core.stage import add_stage_arguments

    p = subparsers.add_parser(
        "seed-sft",
        help="write the seed reasoning data (think/answer completions) for SFT",
        description=(
            "Pick COUNT records balanced over emotions from a unified JSONL, have a teacher "
            "write a <think>...</think><answer>...</answer> completion from the ground truth, "
            "check it with the core filter, and write <root>/<Dataset>_seed.jsonl plus the "
            "quarantined <root>/<Dataset>_seed_rejected.jsonl. Teachers: 'template' (offline, "
            "default) or 'openai' (any OpenAI-compatible endpoint; set "
            "FACIAL_R1_TEACHER_BASE_URL, FACIAL_R1_TEACHER_MODEL, FACIAL_R1_TEACHER_API_KEY)."
        ),
    )
    positional_input(p, "input", "--input", metavar="INPUT", help="input JSONL (seed_sft.input)")
    p.add_argument("--output", default=None, help="accepted JSONL (seed_sft.output)")
    p.add_argument("--count", type=int, default=None, help="samples to select (seed_sft.count)")
    p.add_argument("--teacher", choices=TEACHERS, default=None, help="seed_sft.teacher")
    p.add_argument("--seed", type=int, default=None, help="selection/phrasing seed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_stage_arguments(p)
    p.set_defaults(func=_handler)


def _handler(args) -> int:
    from facial_r1_core.stage import run_stage

    flags = {
        "input": args.input,
        "output": args.output,
        "count": args.count,
        "teacher": args.teacher,
        "seed": args.seed,
    }

    def body(ctx):
        cfg: SeedConfig = ctx.config
        report = build_seed(
            cfg,
            ctx.path(cfg.input),
            output=ctx.path(cfg.output) if cfg.output else None,
            rejected=ctx.path(cfg.rejected) if cfg.rejected else None,
            progress=not args.no_progress,
        )
        outputs = {"seed_jsonl": report.output, "rejected_jsonl": report.rejected_path}
        if ctx.mlflow_run_id and report.output and report.output.stat().st_size:
            with open(report.output, encoding="utf-8") as handle:
                sample = [
                    json.loads(line)["description"]
                    for _, line in zip(range(20), handle, strict=False)
                ]
            ctx.log_text("\n\n".join(sample), "seed_sft/sample_completions.txt")
        log.info(
            "seed data: %d selected, %d accepted, %d rejected -> %s",
            report.selected,
            report.accepted,
            report.rejected,
            report.output,
        )
        return outputs, report.metrics()

    return run_stage(
        args,
        stage="data seed-sft",
        section="seed_sft",
        config_cls=SeedConfig,
        body=body,
        flags=flags,
    )
