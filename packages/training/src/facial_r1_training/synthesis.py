"""Stage 3a, ``facial-r1 synthesize``: reasoning data from the model with ground-truth hints.

For every input record the prompt is the inference prompt plus the ground-truth block
(:func:`facial_r1_core.prompts.synthesis_prompt`). The completion is checked with
:func:`facial_r1_core.filter.check`; a rejected completion is retried with the reflective error
block (the previous response and its issues), up to ``max_retries`` retries, at a temperature
that may rise per retry.

Scheduling is batched: each round hands the backend up to ``round_size`` unfinished samples
(new records and retries alike; by default ``ROUND_BATCHES`` x ``batch_size``), which it decodes
``batch_size`` rows at a time with continuous batching. Retries never serialise the work, and
batches stay full until the input runs dry.

Every finished sample (accepted, rejected after its last retry, or bad input) is appended to a
journal (JSONL, flushed and fsync'd per round) before anything else happens to it; one run at a
time holds the journal's lock. A run that is killed restarts from the journal: finished samples
are skipped, unfinished ones start over, nothing is duplicated, and a damaged journal line is
dropped (logged with its line number, counted as ``journal_damaged``) and its sample redone.
Each attempt samples from its own seed (run seed, sample, attempt), so the resumed run accepts
exactly what an uninterrupted one would. The accepted and rejected files are written atomically
from the journal at the end, and ``read == accepted + rejected`` is checked. The stage contract's
resume rule (:mod:`facial_r1_core.resume`) returns a finished run's result without generating,
and refuses (exit 2) a work folder made with another input, model or settings unless
``--fresh``.

Sharded (``--shards N --shard I``, :mod:`facial_r1_core.shards`): a run processes only slice
``I`` (contiguous record positions) and works in ``<work_dir>/shard-I-of-N/``; every sample
keeps its input line, so its seeds and completions are the 1-shard run's. ``--shards N
--merge`` (:func:`merge`) then writes the final files once, byte for byte the 1-shard ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

from facial_r1_core.config import ConfigError, checked
from facial_r1_core.resume import StageStateError
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

from .generation import GenerationBackend, GenerationRequest, load_image, sample_seed

JOURNAL_KIND = "facial-r1 synthesis journal"
# A round hands the backend this many batches' worth of samples: a continuously batching backend
# (transformers here, vLLM on GPU) keeps its batch full from them, so only the round's last
# rows decode in a thinning batch.
ROUND_BATCHES = 4
log = logging.getLogger("facial_r1.synthesis")


@dataclass
class SynthesisConfig:
    """The ``synthesize`` section of a profile (documented in configs/README.md)."""

    input_file: str = ""
    model_path: str = ""
    output_file: str = ""
    rejected_file: str = ""
    work_dir: str = "runs/synthesis"
    backend: str = "transformers"
    batch_size: int = checked(32, ge=1)
    round_size: int = checked(0, ge=0)  # samples per generate call; 0 = ROUND_BATCHES x batch_size
    max_retries: int = checked(5, ge=0)
    temperature: float = checked(0.7, ge=0)
    temperature_step: float = checked(0.0, ge=0)
    max_temperature: float = checked(1.2, ge=0)
    max_new_tokens: int = checked(96, ge=1)
    top_k: int = checked(0, ge=0)
    emotions: list[str] | None = None
    limit: int = checked(0, ge=0)
    vllm: dict[str, Any] = field(default_factory=dict)
    shards: int = checked(1, ge=1, le=MAX_SHARDS)  # split the input over this many workers
    shard: int = checked(0, ge=0)  # this worker's slice (facial_r1_core.shards)


class SynthesisInterruptedError(RuntimeError):
    """Raised by the ``stop_after`` test hook once that many samples are journaled."""


class JournalMismatchError(StageStateError):
    """The journal on disk belongs to another input, model or settings (exit 2)."""


def temperature_for(attempt: int, cfg: SynthesisConfig) -> float:
    """Sampling temperature for a 0-based attempt number.

    >>> cfg = SynthesisConfig(temperature=0.7, temperature_step=0.2, max_temperature=1.0)
    >>> [round(temperature_for(a, cfg), 2) for a in range(4)]
    [0.7, 0.9, 1.0, 1.0]
    """
    return min(cfg.max_temperature, cfg.temperature + cfg.temperature_step * attempt)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# journal


class JournalLockedError(RuntimeError):
    """Another synthesize run holds the journal's lock."""


def _entry_problem(data: Any) -> str:
    """Why a parsed journal entry cannot be trusted, or ''."""
    from facial_r1_core.schema import RecordError

    if not isinstance(data, dict):
        return "not a JSON object"
    key = data.get("key")
    if not isinstance(key, str) or not key:
        return "no 'key'"
    if not isinstance(data.get("line"), int) or isinstance(data.get("line"), bool):
        return "no integer 'line'"
    if not key.startswith(f"{data['line']}:"):
        return f"key {key!r} does not match line {data['line']}"
    status = data.get("status")
    if status not in ("accepted", "rejected"):
        return f"status {status!r} is neither accepted nor rejected"
    if not isinstance(data.get("attempts"), int):
        return "no integer 'attempts'"
    if status == "accepted":
        try:
            rec = Record.from_dict(data.get("record"))
        except RecordError as exc:
            return f"accepted record invalid: {exc}"
        if not rec.description:
            return "accepted record without a description"
    elif data.get("record") is not None and not isinstance(data.get("record"), dict):
        return "rejected entry's record is not an object"
    return ""


class Journal:
    """Append-only JSONL of finished samples; the first line is a header naming the input.

    One writer at a time: an exclusive ``fcntl`` lock on ``<journal>.lock`` is held while the
    journal is open (released by the kernel when the process dies, so a killed run never leaves
    it locked). On resume every line is checked (:func:`_entry_problem`): a damaged, torn,
    key-less or duplicate line is dropped with its line number logged and counted in
    ``damaged``, its sample is simply redone, and every later line is kept; the journal is
    then rewritten without the dropped lines.
    """

    def __init__(
        self, path: str | os.PathLike, signature: str, input_path: str, *, fresh: bool = False
    ):
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.damaged: list[tuple[int, str]] = []  # (journal line number, reason)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire_lock(self.path)
        try:
            if fresh and self.path.exists():
                self.path.unlink()
            header = {"kind": JOURNAL_KIND, "input": input_path, "signature": signature}
            if self.path.exists() and self.path.stat().st_size > 0:
                self._load(signature)
                if self.damaged:
                    self._rewrite(header)
                self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            else:
                self._handle = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
                self._handle.write(json.dumps(header) + "\n")
                self._sync()
        except BaseException:
            self._lock.close()
            raise

    def _load(self, signature: str) -> None:
        with open(self.path, "rb") as handle:
            blob = handle.read()
        lines = blob.split(b"\n")
        torn = lines.pop() if lines else b""  # after the last newline: empty unless cut short
        first = True
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                data = None
            if first:
                if not isinstance(data, dict) or data.get("kind") != JOURNAL_KIND:
                    raise JournalMismatchError(
                        f"{self.path}: line 1 is not a synthesis journal header"
                    )
                if data.get("signature") != signature:
                    raise JournalMismatchError(
                        f"{self.path}: journal of another run (input {data.get('input')}; "
                        "input content, model or generation settings differ)"
                    )
                first = False
                continue
            problem = "not valid JSON" if data is None else _entry_problem(data)
            if not problem and data["key"] in self.entries:
                problem = f"sample {data['key']} journaled twice"
            if problem:
                self.damaged.append((number, problem))
                continue
            self.entries[data["key"]] = data
        if first:
            raise JournalMismatchError(f"{self.path}: journal without a header")
        if torn.strip():
            self.damaged.append((len(lines) + 1, "cut short (no newline)"))
        for number, problem in self.damaged:
            log.warning(
                "%s:%d: damaged journal line dropped (%s); its sample is redone",
                self.path,
                number,
                problem,
            )

    def _rewrite(self, header: dict[str, Any]) -> None:
        """The journal without its dropped lines (atomic: a crash keeps the old one)."""
        with atomic_write(self.path) as handle:
            handle.write(json.dumps(header) + "\n")
            for entry in self.entries.values():
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def _sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def done(self, key: str) -> bool:
        return key in self.entries

    def append(self, entries: list[dict[str, Any]]) -> None:
        blob = []
        for entry in entries:
            if entry["key"] in self.entries:
                raise AssertionError(f"sample {entry['key']} journaled twice")
            blob.append(json.dumps(entry, ensure_ascii=False) + "\n")
        self._handle.write("".join(blob))
        self._sync()
        for entry in entries:
            self.entries[entry["key"]] = entry

    def close(self) -> None:
        self._handle.close()
        self._lock.close()


def _acquire_lock(journal: Path):
    """An open file holding an exclusive, non-blocking ``flock`` on ``<journal>.lock``."""
    import fcntl

    lock_path = journal.with_name(journal.name + ".lock")
    handle = open(lock_path, "a+")  # noqa: SIM115
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise JournalLockedError(
            f"another synthesize run holds {journal} (lock {lock_path}); wait for it to end, "
            "or give this run another synthesis.work_dir"
        ) from None
    return handle


# --------------------------------------------------------------------------------------------
# the batched loop


@dataclass
class _Pending:
    key: str
    line: int
    record: Record
    image: Any
    emotion_text: str
    attempts: int = 0
    prev_response: str | None = None
    prev_reasons: list[str] = field(default_factory=list)
    code_history: list[str] = field(default_factory=list)


@dataclass
class SynthesisSummary:
    read: int = 0
    accepted: int = 0
    rejected: int = 0
    resumed: int = 0
    journal_damaged: int = 0  # journal lines dropped on resume (their samples were redone)
    generated: int = 0
    backend_calls: int = 0
    wall_time_s: float = 0.0
    reject_codes: dict[str, int] = field(default_factory=dict)
    attempts_histogram: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        rate = self.accepted / self.read if self.read else 0.0
        return {
            "read": self.read,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "acceptance_rate": round(rate, 4),
            "resumed": self.resumed,
            "journal_damaged": self.journal_damaged,
            "generated": self.generated,
            "backend_calls": self.backend_calls,
            "accepted_per_s": round(self.accepted / self.wall_time_s, 3)
            if self.wall_time_s
            else 0.0,
        }


def _emotion_text(record: Record) -> str:
    return ", ".join(record.labels)


def _rejection(key, line, record, raw, attempts, reasons, codes, last=None) -> dict[str, Any]:
    return {
        "key": key,
        "line": line,
        "status": "rejected",
        "id": record.id if record else None,
        "record": record.to_dict() if record else None,
        "raw": raw if record is None else None,
        "attempts": attempts,
        "reasons": reasons,
        "codes": codes,
        "last_completion": last,
    }


def _prepare(result, root: Path) -> tuple[str, _Pending | dict[str, Any]]:
    """A journal key and either a pending sample or a finished rejection (bad input)."""
    if result.record is None:
        key = f"{result.line}:invalid"
        reason = f"bad record: {result.error}"
        return key, _rejection(
            key, result.line, None, result.raw.strip(), 0, [reason], ["bad_record"]
        )
    rec: Record = result.record
    key = f"{result.line}:{rec.id}"
    if not rec.AUs and not rec.labels:
        return key, _rejection(
            key,
            result.line,
            rec,
            None,
            0,
            ["no labels: the record has neither AUs nor an emotion label"],
            ["no_labels"],
        )
    path = rec.image_path(root)
    if not path.is_file():
        return key, _rejection(
            key, result.line, rec, None, 0, [f"image missing: {path}"], ["image_missing"]
        )
    try:
        image = load_image(path)
    except Exception as exc:  # PIL raises several types for broken files
        return key, _rejection(
            key,
            result.line,
            rec,
            None,
            0,
            [f"image undecodable: {path}: {exc}"],
            ["image_undecodable"],
        )
    return key, _Pending(key, result.line, rec, image, _emotion_text(rec))


def iter_input(path: str | os.PathLike, limit: int = 0):
    """Lenient records of the input JSONL, at most ``limit`` (0 = all)."""
    for count, result in enumerate(iter_records_lenient(path, root=Path(path).parent), start=1):
        if limit and count > limit:
            return
        yield result


def synthesize(
    input_file: str | os.PathLike,
    backend: GenerationBackend,
    cfg: SynthesisConfig,
    journal: Journal,
    *,
    emotions: list[str],
    seed: int = 0,
    stop_after: int | None = None,
    progress: bool = True,
) -> SynthesisSummary:
    """Run the batched generate-check-retry loop over the input, journaling finished samples.

    Each attempt samples with its own seed, :func:`generation.sample_seed` of (``seed``, the
    sample's key, the attempt number): a sample's completions depend on nothing else, so a run
    killed anywhere and resumed accepts exactly what an uninterrupted run accepts, whatever the
    batch and round sizes.
    """
    from facial_r1_core.filter import check
    from facial_r1_core.prompts import synthesis_prompt

    start = time.perf_counter()
    root = Path(input_file).parent
    summary = SynthesisSummary()
    source: Iterator = iter_input(input_file, cfg.limit)
    if cfg.shards > 1:  # this shard's contiguous range of record positions, original lines kept
        start_at, stop_at = shard_bounds(
            count_positions(input_file, cfg.limit), cfg.shard, cfg.shards
        )
        source = islice(source, start_at, stop_at)
    pool: deque[_Pending] = deque()
    finished_now = 0
    exhausted = False
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="synthesize", unit="sample")

    def record_finished(entries: list[dict[str, Any]]) -> None:
        nonlocal finished_now
        if not entries:
            return
        journal.append(entries)
        finished_now += len(entries)
        if bar is not None:
            bar.update(len(entries))
        if stop_after is not None and finished_now >= stop_after:
            raise SynthesisInterruptedError(f"stopped after {finished_now} samples (test hook)")

    while True:
        bad: list[dict[str, Any]] = []
        round_size = cfg.round_size or ROUND_BATCHES * backend.batch_size
        while not exhausted and len(pool) < round_size:
            result = next(source, None)
            if result is None:
                exhausted = True
                break
            summary.read += 1
            key = f"{result.line}:{result.record.id}" if result.record else f"{result.line}:invalid"
            if journal.done(key):
                summary.resumed += 1
                continue
            key, item = _prepare(result, root)
            if isinstance(item, dict):
                bad.append(item)
            else:
                pool.append(item)
        record_finished(bad)
        if not pool:
            break
        batch = [pool.popleft() for _ in range(min(round_size, len(pool)))]
        requests = [
            GenerationRequest(
                prompt=synthesis_prompt(
                    p.record.question,
                    emotions,
                    p.record.AUs,
                    p.emotion_text,
                    prev_response=p.prev_response,
                    errors=p.prev_reasons if p.prev_response is not None else None,
                ),
                image=p.image,
                temperature=temperature_for(p.attempts, cfg),
                key=p.key,
                seed=sample_seed(seed, p.key, p.attempts),
            )
            for p in batch
        ]
        completions = backend.generate(requests)
        if len(completions) != len(batch):
            raise RuntimeError(
                f"backend {backend.name} returned {len(completions)} completions for "
                f"{len(batch)} requests"
            )
        summary.generated += len(batch)
        summary.backend_calls += 1
        done: list[dict[str, Any]] = []
        for p, req, text in zip(batch, requests, completions, strict=True):
            p.attempts += 1
            verdict = check(
                text, p.record.AUs, p.record.labels, aus_annotated=aus_annotated(p.record)
            )
            if verdict.accepted:
                rec = Record.from_dict(p.record.to_dict())
                rec.description = text.strip()
                rec.meta_info = {
                    **rec.meta_info,
                    "synthesis": {"attempts": p.attempts, "temperature": req.temperature},
                }
                done.append(
                    {
                        "key": p.key,
                        "line": p.line,
                        "status": "accepted",
                        "id": rec.id,
                        "record": rec.to_dict(),
                        "attempts": p.attempts,
                    }
                )
            elif p.attempts > cfg.max_retries:
                codes = list(dict.fromkeys([*p.code_history, *verdict.codes]))
                done.append(
                    _rejection(
                        p.key,
                        p.line,
                        p.record,
                        None,
                        p.attempts,
                        list(verdict.reasons),
                        codes,
                        last=text,
                    )
                )
            else:
                p.prev_response = text.strip()
                p.prev_reasons = list(verdict.reasons)
                p.code_history.extend(verdict.codes)
                pool.append(p)
        record_finished(done)
    if bar is not None:
        bar.close()
    summary.wall_time_s = time.perf_counter() - start
    return summary


# --------------------------------------------------------------------------------------------
# final outputs


def finalize(
    journal: Journal,
    summary: SynthesisSummary,
    accepted_path: str | os.PathLike,
    rejected_path: str | os.PathLike,
) -> SynthesisSummary:
    """Write accepted/rejected files atomically from the journal, in input order; reconcile."""
    entries = sorted(journal.entries.values(), key=lambda e: e["line"])
    accepted = [e for e in entries if e["status"] == "accepted"]
    rejected = [e for e in entries if e["status"] == "rejected"]
    with atomic_write(accepted_path) as handle:
        for e in accepted:
            handle.write(json.dumps(e["record"], ensure_ascii=False) + "\n")
    with atomic_write(rejected_path) as handle:
        for e in rejected:
            row = {k: v for k, v in e.items() if k not in ("key", "status")}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary.accepted, summary.rejected = len(accepted), len(rejected)
    codes = Counter(c for e in rejected for c in e.get("codes", []))
    summary.reject_codes = dict(sorted(codes.items()))
    summary.attempts_histogram = dict(
        sorted(Counter(str(e["attempts"]) for e in entries).items(), key=lambda kv: int(kv[0]))
    )
    if summary.read != summary.accepted + summary.rejected:
        raise AssertionError(
            f"counts do not reconcile: read {summary.read} != accepted {summary.accepted} + "
            f"rejected {summary.rejected} (journal {journal.path})"
        )
    return summary


def default_output_paths(input_file: str | os.PathLike) -> tuple[Path, Path]:
    """``<root>/<stem>_synth.jsonl`` and ``<root>/<stem>_synth_rejected.jsonl`` beside the input.

    Outputs stay in the input's root so that ``<root>/<dataset>/<image>`` still resolves.

    >>> [p.name for p in default_output_paths("data/demo/DemoFaces_pool.jsonl")]
    ['DemoFaces_pool_synth.jsonl', 'DemoFaces_pool_synth_rejected.jsonl']
    """
    path = Path(input_file)
    return (
        path.with_name(f"{path.stem}_synth.jsonl"),
        path.with_name(f"{path.stem}_synth_rejected.jsonl"),
    )


def output_paths(cfg: SynthesisConfig, shard: int | None = None) -> tuple[Path, Path, Path]:
    """(accepted file, rejected file, work folder) of a run, or of shard ``shard`` (default: the
    config's own) when ``cfg.shards`` > 1: the shard works in ``<work_dir>/shard-I-of-N/`` and
    writes its files there, under the final files' names (intermediate files stay out of the
    data folder, so only the merged files are versioned; :mod:`facial_r1_core.shards`)."""
    check_shard(cfg.shard if shard is None else shard, cfg.shards)
    accepted_default, rejected_default = default_output_paths(cfg.input_file)
    accepted = Path(cfg.output_file) if cfg.output_file else accepted_default
    rejected = Path(cfg.rejected_file) if cfg.rejected_file else rejected_default
    work = Path(cfg.work_dir)
    if cfg.shards > 1:
        i = cfg.shard if shard is None else shard
        work = Path(shard_dir(work, i, cfg.shards))
        accepted, rejected = work / accepted.name, work / rejected.name
    return accepted, rejected, work


def model_fingerprint(model_path: str | os.PathLike) -> str:
    """Path plus name, size and mtime of the weight files (cheap even for 15 GB checkpoints)."""
    path = Path(model_path)
    parts = [str(path.resolve()) if path.exists() else str(model_path)]
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def generation_settings(cfg: SynthesisConfig, seed: int) -> dict[str, Any]:
    """The settings a sample's completions depend on (batch and round sizes do not count)."""
    return {
        "seed": seed,
        "backend": cfg.backend,
        "emotions": cfg.emotions,
        "max_retries": cfg.max_retries,
        "temperature": [cfg.temperature, cfg.temperature_step, cfg.max_temperature],
        "max_new_tokens": cfg.max_new_tokens,
        "top_k": cfg.top_k,
        "limit": cfg.limit,
        # only when sharded, so the settings of unsharded runs stay what they were
        **({"shard": [cfg.shard, cfg.shards]} if cfg.shards > 1 else {}),
    }


def run_signature(
    input_file: str | os.PathLike, cfg: SynthesisConfig, model_id: str, seed: int = 0
) -> str:
    """What must match for a journal to be resumed: input content, model, generation settings."""
    settings = {
        "input_sha256": file_sha256(input_file),
        "model": model_id,
        "seed": seed,
        "emotions": cfg.emotions,
        "max_retries": cfg.max_retries,
        "temperature": [cfg.temperature, cfg.temperature_step, cfg.max_temperature],
        "max_new_tokens": cfg.max_new_tokens,
        "top_k": cfg.top_k,
        "limit": cfg.limit,
        **({"shard": [cfg.shard, cfg.shards]} if cfg.shards > 1 else {}),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def run(
    cfg: SynthesisConfig,
    backend: GenerationBackend,
    *,
    emotions: list[str],
    model_id: str = "",
    seed: int = 0,
    fresh: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> tuple[SynthesisSummary, dict[str, str]]:
    """Synthesis end to end for a config and a backend; returns the summary and output paths."""
    if not cfg.input_file:
        raise ValueError("synthesize.input_file is not set (or pass INPUT)")
    input_file = Path(cfg.input_file)
    if not input_file.is_file():
        raise FileNotFoundError(f"synthesis input not found: {input_file}")
    accepted_path, rejected_path, work = output_paths(cfg)
    journal_path = work / "journal.jsonl"
    ensure_not_input(
        [accepted_path, rejected_path, journal_path, work / "synthesis_stats.json"],
        [input_file],
        "synthesize",
    )
    signature = run_signature(input_file, cfg, model_id, seed)
    try:
        journal = Journal(journal_path, signature, str(input_file), fresh=fresh)
    except JournalMismatchError as exc:
        raise JournalMismatchError(
            f"{exc}; pass --fresh to start over (the journal is discarded)"
        ) from None
    try:
        summary = synthesize(
            input_file,
            backend,
            cfg,
            journal,
            emotions=emotions,
            seed=seed,
            stop_after=stop_after,
            progress=progress,
        )
        summary.journal_damaged = len(journal.damaged)
        finalize(journal, summary, accepted_path, rejected_path)
    finally:
        journal.close()
    stats = {
        **summary.metrics(),
        "signature": signature,
        "reject_codes": summary.reject_codes,
        "attempts_histogram": summary.attempts_histogram,
        "wall_time_s": round(summary.wall_time_s, 3),
    }
    stats_path = work / "synthesis_stats.json"
    with atomic_write(stats_path) as handle:
        json.dump(stats, handle, indent=2)
    outputs = {
        "accepted": str(accepted_path),
        "rejected": str(rejected_path),
        "journal": str(journal_path),
        "stats": str(stats_path),
    }
    return summary, outputs


def _read_rows(path: Path, what: str, shard: int, shards: int) -> list[tuple[str, dict]]:
    """(raw line, parsed row) of a shard output; ShardMergeError names a damaged line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.rstrip("\n")
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ShardMergeError(
                    f"shard {shard} of {shards}: {path}:{number}: {what} line is not JSON "
                    f"({exc.msg})"
                ) from None
            if not isinstance(row, dict):
                raise ShardMergeError(
                    f"shard {shard} of {shards}: {path}:{number}: {what} line is not an object"
                )
            rows.append((text, row))
    return rows


def merge(
    cfg: SynthesisConfig, *, model_id: str = "", seed: int = 0
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge the ``cfg.shards`` shard outputs into the final accepted and rejected files, once.

    Every shard must have finished (its statistics hold the signature of this input, model,
    settings and shard); every input record must appear in exactly one shard's output, in the
    shard whose range holds it, and nothing else may (:func:`facial_r1_core.shards.
    check_coverage`); each shard's counts must reconcile (read = accepted + rejected). Otherwise
    :class:`~facial_r1_core.shards.ShardMergeError` names the shard and the record, and nothing
    is written. The merged files hold the shards' lines unchanged, in input order: the same
    bytes as a 1-shard run. Returns (statistics, output paths).
    """
    if cfg.shards < 2:
        raise ValueError("merging needs synthesize.shards >= 2 (--shards N)")
    input_file = Path(cfg.input_file)
    if not input_file.is_file():
        raise FileNotFoundError(f"synthesis input not found: {input_file}")
    expected: list[str] = []
    describe: dict[str, str] = {}
    for result in iter_input(input_file, cfg.limit):
        key = result.record.id if result.record is not None else f"line {result.line}"
        expected.append(key)
        describe[key] = f" (input line {result.line})"
    items: dict[int, list[str]] = {}
    rows: dict[str, tuple[str, str]] = {}  # key -> (accepted|rejected, raw line)
    totals: Counter = Counter()
    for i in range(cfg.shards):
        accepted_path, rejected_path, work = output_paths(cfg, i)
        stats_path = work / "synthesis_stats.json"
        for path in (stats_path, accepted_path, rejected_path):
            if not path.is_file():
                raise ShardMergeError(
                    f"shard {i} of {cfg.shards}: output missing: {path} (run it: facial-r1 "
                    f"synthesize ... --shards {cfg.shards} --shard {i})"
                )
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        want = run_signature(input_file, replace(cfg, shard=i), model_id, seed)
        if stats.get("signature") != want:
            raise ShardMergeError(
                f"shard {i} of {cfg.shards}: {stats_path} is from another input, model or "
                "settings (signature differs): run the shard again"
            )
        keys = []
        for kind, path in (("accepted", accepted_path), ("rejected", rejected_path)):
            for text, row in _read_rows(path, kind, i, cfg.shards):
                if kind == "accepted":
                    key = row.get("id")
                else:
                    key = row.get("id") or f"line {row.get('line')}"
                if not isinstance(key, str) or not key:
                    raise ShardMergeError(f"shard {i} of {cfg.shards}: {path}: a row without id")
                keys.append(key)
                rows.setdefault(key, (kind, text))
                totals[kind] += 1
        counted = {k: stats.get(k) for k in ("read", "accepted", "rejected")}
        if counted["read"] != counted["accepted"] + counted["rejected"] or counted["read"] != len(
            keys
        ):
            raise ShardMergeError(
                f"shard {i} of {cfg.shards}: counts do not reconcile: read {counted['read']}, "
                f"accepted {counted['accepted']} + rejected {counted['rejected']}, "
                f"{len(keys)} output rows"
            )
        for key in ("generated", "backend_calls", "resumed", "journal_damaged"):
            totals[key] += int(stats.get(key) or 0)
        totals["wall_time_max"] = max(totals["wall_time_max"], float(stats.get("wall_time_s", 0)))
        items[i] = keys
    check_coverage(expected, items, cfg.shards, describe=describe)
    accepted_path, rejected_path = (
        Path(cfg.output_file) if cfg.output_file else default_output_paths(input_file)[0],
        Path(cfg.rejected_file) if cfg.rejected_file else default_output_paths(input_file)[1],
    )
    ensure_not_input([accepted_path, rejected_path], [input_file], "synthesize")
    ordered = [rows[key] for key in expected]
    with atomic_write(accepted_path) as handle:
        handle.writelines(text + "\n" for kind, text in ordered if kind == "accepted")
    with atomic_write(rejected_path) as handle:
        handle.writelines(text + "\n" for kind, text in ordered if kind == "rejected")
    read, accepted, rejected = len(expected), totals["accepted"], totals["rejected"]
    if read != accepted + rejected:
        raise AssertionError(f"counts do not reconcile: read {read} != {accepted} + {rejected}")
    codes: Counter = Counter()
    attempts: Counter = Counter()
    for kind, text in ordered:
        row = json.loads(text)
        if kind == "rejected":
            codes.update(row.get("codes") or [])
            attempts[str(row.get("attempts"))] += 1
        else:
            tries = ((row.get("meta_info") or {}).get("synthesis") or {}).get("attempts")
            attempts[str(tries)] += 1
    wall = totals["wall_time_max"]
    stats = {
        "read": read,
        "accepted": accepted,
        "rejected": rejected,
        "acceptance_rate": round(accepted / read, 4) if read else 0.0,
        "resumed": totals["resumed"],
        "journal_damaged": totals["journal_damaged"],
        "generated": totals["generated"],
        "backend_calls": totals["backend_calls"],
        "accepted_per_s": round(accepted / wall, 3) if wall else 0.0,
        "shards": cfg.shards,
        "reject_codes": dict(sorted(codes.items())),
        "attempts_histogram": dict(sorted(attempts.items(), key=lambda kv: int(kv[0]))),
        "wall_time_s": round(wall, 3),
    }
    work = Path(cfg.work_dir)
    stats_path = work / "synthesis_stats.json"
    with atomic_write(stats_path) as handle:
        json.dump(stats, handle, indent=2)
    outputs = {
        "accepted": str(accepted_path),
        "rejected": str(rejected_path),
        "stats": str(stats_path),
    }
    return stats, outputs


# --------------------------------------------------------------------------------------------
# the command


def resolve_model_path(ctx, value: str) -> str:
    """A local folder (relative to the project home) if it exists, else the value (hub id)."""
    local = ctx.path(value)
    return str(local) if local.exists() else value


def prompt_emotions(configured: list[str] | None) -> list[str]:
    """The emotion list shown in prompts: the profile's, else the 8 emotions (with contempt)."""
    from facial_r1_core.vocab import EMOTIONS, normalize_emotion

    return [normalize_emotion(e) for e in configured] if configured else list(EMOTIONS)


def add_parser(subparsers) -> None:
    from facial_r1_core.cli import positional_input
    from facial_r1_core.schema import add_skip_bad_records_argument
    from facial_r1_core.shards import add_shard_arguments

    from .stage import add_stage_arguments

    parser = subparsers.add_parser(
        "synthesize",
        help="stage 3a: synthesize reasoning data with ground-truth hints, filter, retry",
        description=(
            "For each input record: prompt = inference prompt + ground-truth block; sample; "
            "check with the core filter; retry rejected samples with the reflective error "
            "block (up to synthesize.max_retries). Batched over all pending samples, resumable "
            "from a journal. Writes accepted records (description = the completion) and "
            "rejected records with reasons and attempt counts."
        ),
    )
    positional_input(
        parser, "input", "--input", metavar="INPUT", help="input JSONL (synthesize.input_file)"
    )
    parser.add_argument("--model", help="model folder or hub id (synthesize.model_path)")
    parser.add_argument("--output", help="accepted JSONL (synthesize.output_file)")
    parser.add_argument("--limit", type=int, help="at most N input records (synthesize.limit)")
    add_skip_bad_records_argument(parser)
    add_shard_arguments(parser, "synthesize")
    add_stage_arguments(parser, resumable=True)
    parser.set_defaults(func=main)


def main(args) -> int:
    from facial_r1_core.shards import ShardError, check_shard_flags

    from .stage import run_stage

    try:
        check_shard_flags(args, "synthesize")
    except ShardError as exc:
        print(f"facial-r1 synthesize: configuration error: {exc}", file=sys.stderr)
        return 2
    return run_stage(
        args,
        stage="synthesize",
        section="synthesize",
        config_cls=SynthesisConfig,
        body=_body,
        flags={
            "input_file": args.input,
            "model_path": args.model,
            "output_file": args.output,
            "limit": args.limit,
            "shards": getattr(args, "shards", None),
            "shard": getattr(args, "shard", None),
        },
    )


def _body(ctx) -> tuple[dict[str, Any], dict[str, Any]]:
    from .generation import create_backend

    cfg: SynthesisConfig = ctx.config
    try:
        check_shard(cfg.shard, cfg.shards)
    except ValueError as exc:
        raise ConfigError(f"synthesize: {exc}") from None
    if not cfg.model_path:
        raise ValueError("synthesize.model_path is not set (or pass --model)")
    cfg.input_file = str(ctx.path(cfg.input_file)) if cfg.input_file else ""
    for name in ("output_file", "rejected_file"):
        if getattr(cfg, name):
            setattr(cfg, name, str(ctx.path(getattr(cfg, name))))
    cfg.work_dir = str(ctx.path(cfg.work_dir))
    if cfg.input_file and Path(cfg.input_file).is_file():
        from .data import check_inputs

        check_inputs(ctx, [cfg.input_file], limit=cfg.limit)
    model_path = resolve_model_path(ctx, cfg.model_path)
    if not cfg.input_file:
        raise ValueError("synthesize.input_file is not set (or pass INPUT)")
    if getattr(ctx.args, "merge", False):
        stats, outputs = merge(cfg, model_id=model_fingerprint(model_path), seed=ctx.seed)
        ctx.log_artifact(outputs["stats"])
        ctx.log_artifact(outputs["rejected"], "synthesis")
        metrics = {k: v for k, v in stats.items() if not isinstance(v, dict)}
        for code, count in stats["reject_codes"].items():
            metrics[f"reject_{code}"] = count
        return outputs, metrics
    accepted_path, rejected_path, work_dir = output_paths(cfg)
    state = ctx.resume_state(
        work_dir,
        inputs={"input_file": cfg.input_file, "model": model_path},
        settings={
            "synthesis": {
                **generation_settings(cfg, ctx.seed),
                "output_file": str(accepted_path),
                "rejected_file": str(rejected_path),
            }
        },
        leftovers=(work_dir / "journal.jsonl").exists(),
    )
    if state.done:
        log.info("synthesis finished earlier with the same inputs and settings (--fresh redoes it)")
        return state.result["outputs"], state.result["metrics"]
    backend = create_backend(
        cfg.backend,
        model_path,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        top_k=cfg.top_k,
        seed=ctx.seed,
        vllm_options=cfg.vllm,
    )
    summary, outputs = run(
        cfg,
        backend,
        emotions=prompt_emotions(cfg.emotions),
        model_id=model_fingerprint(model_path),
        seed=ctx.seed,
        fresh=state.status == "new",
    )
    ctx.log_artifact(outputs["stats"])
    ctx.log_artifact(outputs["rejected"], "synthesis")
    metrics = {**summary.metrics(), "wall_time_s": round(summary.wall_time_s, 3)}
    for code, count in summary.reject_codes.items():
        metrics[f"reject_{code}"] = count
    state.complete(outputs, metrics, [outputs["accepted"], outputs["rejected"]])
    return outputs, metrics
