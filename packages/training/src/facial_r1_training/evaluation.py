"""``facial-r1 evaluate``: batched greedy generation on a test JSONL and the core metrics.

Metrics (all from :mod:`facial_r1_core.metrics`, via the one parser): format rate, emotion
accuracy overall and per class with the confusion matrix, AU F1 micro/macro/per AU (optionally on
the BP4D or DISFA protocol subset) over every AU-annotated record, frames coded with no AU
active included (:func:`facial_r1_core.schema.aus_annotated`; an AU named on such a frame is a
false positive), the per-AU average F1 over BP4D-12 / DISFA-8 for the test records of those
datasets, ROUGE-L of the reasoning against the reference description and REGE (FABA's definition,
:func:`facial_r1_core.metrics.rege`) when the test set has descriptions, and the optional LLM
judge (failures reported as failures).

Every result carries ``n`` (records scored) and ``test_set_fingerprint``: the sha256 of the
scored records' ids and ground truth (one canonical JSON line ``[id, AUs, aus_annotated,
labels]`` per record, sorted by id). Two evaluations share a fingerprint exactly when they scored
the same records against the same truth, whatever the line order of the file; ``--limit``, a
skipped image or a changed label gives another fingerprint. Promotion compares scores only
between evaluations with the same fingerprint. An empty test set (no record could be scored) or a
negative ``--limit`` is a usage error (exit 2): there is no result to compare.

Outputs in ``evaluate.output_dir``: ``predictions.jsonl``, ``report.json``, ``report.md``,
``confusion.png``, ``au_f1.png``; all logged to the stage's MLflow run. Records whose image is
missing or undecodable are skipped with their reason and counted (``skipped``), never a crash:
``read == evaluated + skipped``.

Sharded (``--shards N --shard I``): a run generates the predictions of slice ``I`` only, into
``<output_dir>/shard-I-of-N/`` (no metric); ``--shards N --merge`` (:func:`merge`) checks that
every test record was predicted or skipped exactly once and scores the pooled predictions once,
with the same code as an unsharded run, so the report (``n`` and the fingerprint included)
equals the unsharded one.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facial_r1_core.config import ConfigError, checked
from facial_r1_core.schema import (
    Record,
    atomic_write,
    aus_annotated,
    ensure_not_input,
    iter_records_lenient,
)
from facial_r1_core.shards import (
    MAX_SHARDS,
    ShardMergeError,
    check_coverage,
    check_shard,
    count_positions,
    shard_bounds,
    shard_dir,
)

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
    shards: int = checked(1, ge=1, le=MAX_SHARDS)  # split the test set over this many workers
    shard: int = checked(0, ge=0)  # this worker's slice (facial_r1_core.shards)


#: Dataset-name prefixes (lower case, without ``-`` / ``_``) of the AU protocols reported apart.
AU_PROTOCOLS = {"bp4d": "au_f1_bp4d12", "disfa": "au_f1_disfa8"}


class EmptyTestSetError(ConfigError):
    """Nothing to score: an empty test file, or every record skipped (exit 2, no result)."""


def fingerprint_test_set(records: list[Record]) -> str:
    """sha256 of the scored records' ids and truth, independent of their order.

    >>> a = Record.create(dataset="D", image="1.png", question="q", AUs=["AU4"], labels=["anger"])
    >>> b = Record.create(dataset="D", image="2.png", question="q", labels=["fear"])
    >>> fingerprint_test_set([a, b]) == fingerprint_test_set([b, a]) != fingerprint_test_set([a])
    True
    """
    import hashlib

    digest = hashlib.sha256()
    for rec in sorted(records, key=lambda r: r.id):
        row = [rec.id, sorted(rec.AUs), aus_annotated(rec), sorted(rec.labels)]
        digest.update(json.dumps(row, separators=(",", ":")).encode() + b"\n")
    return digest.hexdigest()


def _protocol(dataset: str) -> str | None:
    key = dataset.lower().replace("-", "").replace("_", "")
    return next((p for p in AU_PROTOCOLS if key.startswith(p)), None)


def _single(labels) -> str | None:
    return labels[0] if len(labels) == 1 else None


def _reasoning(text: str) -> str:
    from facial_r1_core.parser import parse_completion

    parsed = parse_completion(text or "")
    return parsed.think if parsed.think is not None else (text or "")


def load_test_set(
    path: Path, limit: int = 0, bounds: tuple[int, int] | None = None
) -> tuple[list[tuple[Record, Any]], list[dict]]:
    """(record, image) pairs ready to evaluate, and the skipped lines with their reasons; only
    the record positions in ``bounds`` (``[start, stop)``, a shard's range) when given."""
    root = path.parent
    ready: list[tuple[Record, Any]] = []
    skipped: list[dict[str, Any]] = []
    for count, result in enumerate(iter_records_lenient(path, root=root), start=1):
        if limit and count > limit:
            break
        if bounds is not None and not bounds[0] <= count - 1 < bounds[1]:
            continue
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


def check_limit(limit: Any) -> None:
    """``evaluate.limit`` / ``--limit``: 0 (every record) or a positive count."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigError(
            f"evaluate.limit (--limit) must be 0 (all records) or a positive count, got {limit!r}"
        )


def compute_metrics(
    records: list[Record],
    completions: list[str],
    emotions: list[str],
    au_subset: str | None = None,
) -> dict[str, Any]:
    """The report body: every metric, from records and their completions."""
    from facial_r1_core.metrics import au_metrics, emotion_metrics, rege, rouge_l
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
    au_idx = [i for i, r in enumerate(records) if aus_annotated(r)]
    report["au"] = au_metrics(
        [set(records[i].AUs) for i in au_idx],
        [set(parsed[i].aus) for i in au_idx],
        subset=au_subset,
    )
    report["au"]["au_free"] = sum(1 for i in au_idx if not records[i].AUs)
    protocols = {}
    for protocol in AU_PROTOCOLS:
        idx = [i for i in au_idx if _protocol(records[i].dataset) == protocol]
        if idx:
            m = au_metrics(
                [set(records[i].AUs) for i in idx], [set(parsed[i].aus) for i in idx], protocol
            )
            protocols[protocol] = {k: m[k] for k in ("average_f1", "micro_f1", "per_au", "n")}
    if protocols:
        report["au_protocols"] = protocols
    ref_idx = [i for i, r in enumerate(records) if r.description.strip()]
    if ref_idx:
        report["rouge_l"] = rouge_l(
            [_reasoning(completions[i]) for i in ref_idx],
            [_reasoning(records[i].description) for i in ref_idx],
        )
        report["rouge_l_n"] = len(ref_idx)
        # REGE on the records with a description: FABA adds the recognition score (emotion
        # accuracy for the emotion task, AU F1 for the AU task) to ROUGE-L, both in percent.
        ref_emo = [i for i in ref_idx if _single(records[i].labels)]
        if ref_emo:
            acc = emotion_metrics(
                [records[i].labels[0] for i in ref_emo],
                [_single(parsed[i].emotions) for i in ref_emo],
                classes=classes,
            )["accuracy"]
            report["rege_emotion"] = rege(acc, report["rouge_l"])
        ref_au = [i for i in ref_idx if aus_annotated(records[i])]
        if ref_au:
            f1 = au_metrics(
                [set(records[i].AUs) for i in ref_au],
                [set(parsed[i].aus) for i in ref_au],
                subset=au_subset,
            )["micro_f1"]
            report["rege_au"] = rege(f1, report["rouge_l"])
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
    for protocol, key in AU_PROTOCOLS.items():
        if protocol in report.get("au_protocols", {}):
            out[key] = report["au_protocols"][protocol]["average_f1"]
    for key in (
        "rouge_l",
        "rege_emotion",
        "rege_au",
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
        f"Test set: `{report.get('test_file', '')}` ({report['n']} records scored, "
        f"fingerprint `{report.get('test_set_fingerprint', '')[:16]}`)",
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
    """Generate, score, write the report files; returns (report, output paths). A shard
    (``cfg.shards`` > 1) generates its slice only and returns its counts (:func:`write_shard`).

    :class:`EmptyTestSetError` (a :class:`ConfigError`: exit 2) when no record can be scored.
    """
    from facial_r1_core.prompts import sft_prompt

    check_limit(cfg.limit)
    check_shard(cfg.shard, cfg.shards)
    names = ("predictions.jsonl", "report.json", "report.md")
    if cfg.shards > 1:
        output_dir = Path(shard_dir(output_dir, cfg.shard, cfg.shards))
    ensure_not_input([output_dir / n for n in names], [test_file], "evaluate")
    bounds = (
        shard_bounds(count_positions(test_file, cfg.limit), cfg.shard, cfg.shards)
        if cfg.shards > 1
        else None
    )
    ready, skipped = load_test_set(test_file, cfg.limit, bounds)
    records = [r for r, _ in ready]
    if not records and cfg.shards == 1:  # an empty slice of a shard is left to the merge
        first = f" (first: line {skipped[0]['line']}: {skipped[0]['reason']})" if skipped else ""
        raise EmptyTestSetError(
            f"no record to evaluate in {test_file}: {len(skipped)} read, all skipped{first}"
            if skipped
            else f"test file {test_file} holds no records: nothing to evaluate"
        )
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
    if cfg.shards > 1:
        return write_shard(
            cfg, records, completions, skipped, output_dir, test_file, model_id, elapsed
        )
    return write_report(
        cfg,
        records,
        completions,
        skipped,
        emotions=emotions,
        output_dir=output_dir,
        test_file=test_file,
        model_id=model_id,
        read=len(ready) + len(skipped),
        elapsed=elapsed,
    )


def write_report(
    cfg: EvaluateConfig,
    records: list[Record],
    completions: list[str],
    skipped: list[dict[str, Any]],
    *,
    emotions: list[str],
    output_dir: Path,
    test_file: Path,
    model_id: str,
    read: int,
    elapsed: float,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Score the records' completions once (core metrics), write and return the report: the one
    path of an unsharded evaluation and of the merge of a sharded one."""
    report = compute_metrics(records, completions, emotions, cfg.au_subset)
    report.update(
        model=model_id,
        test_file=str(test_file),
        test_set_fingerprint=fingerprint_test_set(records),
        limit=cfg.limit,
        read=read,
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
        for rec, text in zip(records, completions, strict=True):
            handle.write(_prediction_row(rec, text) + "\n")
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


def shard_signature(cfg: EvaluateConfig, test_file: Path, model_id: str, shard: int) -> str:
    """What a shard's predictions depend on: test file content, model, generation settings and
    the split; the merge refuses a shard folder with another signature."""
    import hashlib

    from .synthesis import file_sha256

    blob = {
        "test_sha256": file_sha256(test_file),
        "model": model_id,
        "backend": cfg.backend,
        "max_new_tokens": cfg.max_new_tokens,
        "emotions": cfg.emotions,
        "limit": cfg.limit,
        "shard": [shard, cfg.shards],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _prediction_row(rec: Record, text: str) -> str:
    from facial_r1_core.parser import parse_completion

    p = parse_completion(text)
    return json.dumps(
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


def write_shard(
    cfg: EvaluateConfig,
    records: list[Record],
    completions: list[str],
    skipped: list[dict[str, Any]],
    output_dir: Path,
    test_file: Path,
    model_id: str,
    elapsed: float,
) -> tuple[dict[str, Any], dict[str, str]]:
    """A shard's per-record predictions and its ``shard.json`` (counts, skipped lines,
    signature); no metric: those are computed once, on the merged predictions."""
    output_dir.mkdir(parents=True, exist_ok=True)
    preds = output_dir / "predictions.jsonl"
    with atomic_write(preds) as handle:
        for rec, text in zip(records, completions, strict=True):
            handle.write(_prediction_row(rec, text) + "\n")
    info = {
        "shard": cfg.shard,
        "shards": cfg.shards,
        "read": len(records) + len(skipped),
        "n": len(records),
        "skipped": len(skipped),
        "skipped_lines": skipped,
        "generation_s": round(elapsed, 3),
        "signature": shard_signature(cfg, test_file, model_id, cfg.shard),
    }
    shard_json = output_dir / "shard.json"
    with atomic_write(shard_json) as handle:
        json.dump(info, handle, indent=2)
    summary = {k: info[k] for k in ("read", "n", "skipped", "generation_s", "shard", "shards")}
    return summary, {"predictions": str(preds), "shard": str(shard_json)}


def merge(
    cfg: EvaluateConfig,
    *,
    emotions: list[str],
    output_dir: Path,
    test_file: Path,
    model_id: str = "",
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge the ``cfg.shards`` shards' predictions and score them once, as one evaluation.

    Every test record (after ``limit``) must appear exactly once over the shards, scored or
    skipped, in the shard whose range holds it, and nothing else may
    (:func:`facial_r1_core.shards.check_coverage`); every shard must carry the signature of
    this test file, model and settings. Otherwise ShardMergeError names the shard and the record
    and nothing is written. The report is then exactly the unsharded one (same records in the
    same order, same completions, same ``n`` and ``test_set_fingerprint``).
    """
    check_limit(cfg.limit)
    if cfg.shards < 2:
        raise ConfigError("merging needs evaluate.shards >= 2 (--shards N)")
    results = []
    for count, result in enumerate(iter_records_lenient(test_file, root=test_file.parent), 1):
        if cfg.limit and count > cfg.limit:
            break
        results.append(result)
    key_of = [r.record.id if r.record is not None else f"line {r.line}" for r in results]
    describe = {k: f" (test line {r.line})" for k, r in zip(key_of, results, strict=True)}
    items: dict[int, list[str]] = {}
    completions_by_id: dict[str, str] = {}
    skipped: list[dict[str, Any]] = []
    slowest = 0.0
    for i in range(cfg.shards):
        folder = Path(shard_dir(output_dir, i, cfg.shards))
        info_path, preds_path = folder / "shard.json", folder / "predictions.jsonl"
        for path in (info_path, preds_path):
            if not path.is_file():
                raise ShardMergeError(
                    f"shard {i} of {cfg.shards}: output missing: {path} (run it: facial-r1 "
                    f"evaluate ... --shards {cfg.shards} --shard {i})"
                )
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("signature") != shard_signature(cfg, test_file, model_id, i):
            raise ShardMergeError(
                f"shard {i} of {cfg.shards}: {info_path} is from another test file, model or "
                "settings (signature differs): run the shard again"
            )
        keys = []
        for number, line in enumerate(preds_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, text = row["id"], row["completion"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ShardMergeError(
                    f"shard {i} of {cfg.shards}: {preds_path}:{number}: not a prediction row"
                ) from None
            keys.append(key)
            completions_by_id.setdefault(key, text)
        for entry in info.get("skipped_lines") or []:
            keys.append(entry.get("id") or f"line {entry.get('line')}")
            skipped.append(entry)
        if info.get("read") != len(keys):
            raise ShardMergeError(
                f"shard {i} of {cfg.shards}: counts do not reconcile: read {info.get('read')}, "
                f"{len(keys)} predictions + skipped"
            )
        slowest = max(slowest, float(info.get("generation_s") or 0.0))
        items[i] = keys
    check_coverage(key_of, items, cfg.shards, describe=describe)
    records = [r.record for r, key in zip(results, key_of, strict=True) if key in completions_by_id]
    if not records:
        raise EmptyTestSetError(
            f"no record to evaluate in {test_file}: {len(skipped)} read, all skipped"
        )
    completions = [completions_by_id[r.id] for r in records]
    skipped.sort(key=lambda e: e.get("line", 0))
    report, outputs = write_report(
        cfg,
        records,
        completions,
        skipped,
        emotions=emotions,
        output_dir=output_dir,
        test_file=test_file,
        model_id=model_id,
        read=len(results),
        elapsed=slowest,
    )
    return report, outputs


# --------------------------------------------------------------------------------------------
# the command


def add_parser(subparsers) -> None:
    from facial_r1_core.cli import positional_input
    from facial_r1_core.schema import add_skip_bad_records_argument
    from facial_r1_core.shards import add_shard_arguments

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
    positional_input(
        parser, "test_file", "--test-file", metavar="TEST", help="test JSONL (evaluate.test_file)"
    )
    parser.add_argument("--output-dir", help="report folder (overrides evaluate.output_dir)")
    parser.add_argument("--limit", type=int, help="at most N test records")
    add_skip_bad_records_argument(parser)
    add_shard_arguments(parser, "evaluate")
    add_stage_arguments(parser)
    parser.set_defaults(func=main)


def main(args) -> int:
    from facial_r1_core.shards import ShardError, check_shard_flags

    from .stage import run_stage

    try:
        check_shard_flags(args, "evaluate")
    except ShardError as exc:
        print(f"facial-r1 evaluate: configuration error: {exc}", file=sys.stderr)
        return 2
    return run_stage(
        args,
        stage="evaluate",
        section="evaluate",
        config_cls=EvaluateConfig,
        body=_body,
        flags={
            "model_path": args.model,
            "test_file": args.test_file,
            "output_dir": args.output_dir,
            "limit": args.limit,
            "shards": getattr(args, "shards", None),
            "shard": getattr(args, "shard", None),
        },
    )


def _body(ctx) -> tuple[dict[str, Any], dict[str, Any]]:
    from .analyze import resolve_model
    from .generation import create_backend
    from .synthesis import prompt_emotions

    cfg: EvaluateConfig = ctx.config
    if not cfg.model_path:
        raise ValueError("evaluate.model_path is not set (or pass --model)")
    if not cfg.test_file:
        raise ValueError("evaluate.test_file is not set (or pass TEST)")
    test_file = ctx.path(cfg.test_file)
    if not test_file.is_file():
        raise FileNotFoundError(f"test file not found: {test_file}")
    from facial_r1_core.schema import iter_jsonl_lines

    if next(iter_jsonl_lines(test_file), None) is None:  # before loading any model
        raise EmptyTestSetError(f"test file {test_file} holds no records: nothing to evaluate")
    from .data import check_inputs

    try:
        check_shard(cfg.shard, cfg.shards)
    except ValueError as exc:
        raise ConfigError(f"evaluate: {exc}") from None
    check_inputs(ctx, [test_file], limit=max(cfg.limit or 0, 0))
    if getattr(ctx.args, "merge", False):
        report, outputs = merge(
            cfg,
            emotions=prompt_emotions(cfg.emotions),
            output_dir=ctx.path(cfg.output_dir),
            test_file=test_file,
            model_id=str(cfg.model_path),
        )
    else:
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
        if cfg.shards > 1:  # one slice: predictions only, scored by the merge
            ctx.log_artifact(outputs["predictions"], "evaluation")
            return outputs, report
    for name in ("report", "report_md", "predictions", "confusion", "au_f1"):
        ctx.log_artifact(outputs[name], "evaluation")
    metrics = headline(report)
    outputs["test_set_fingerprint"] = report["test_set_fingerprint"]
    ctx.set_tags(
        {"test_set_fingerprint": report["test_set_fingerprint"], "test_set_n": report["n"]}
    )
    emo = report["emotion"]
    for i, cls in enumerate(emo["classes"][:-1]):
        if sum(emo["confusion"][i]):
            metrics[f"emotion_acc_{cls}"] = emo["per_class"][cls]
    for au, v in report["au"]["per_au"].items():
        if v["support"]:
            metrics[f"au_f1_{au}"] = v["f1"]
    return outputs, metrics
