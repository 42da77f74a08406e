"""Sharded synthesis and evaluation: N slices merged once equal the 1-shard run, byte for byte;
the merge refuses a missing shard or a record twice, naming both; a shard resumes on its own."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from facial_r1_core.shards import ShardMergeError
from facial_r1_training import evaluation, synthesis
from facial_r1_training.generation import ScriptedBackend, create_backend, sample_seed
from facial_r1_training.testing import toy_completion, write_toy_dataset

EMOS = ["happiness", "sadness", "surprise", "anger"]


def by_seed(req, _i):
    """Accept or fail by the request's own seed (so by sample and attempt, never by batch)."""
    emo = next(e for e in EMOS if f"emotion: {e}" in req.prompt)
    if req.seed % 3 == 0:
        return "<think>Lowered brows (AU4).</think><answer>fear</answer>"
    from facial_r1_training.testing import TOY_CLASSES

    return toy_completion(TOY_CLASSES[emo][0], emo)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    path = write_toy_dataset(root, 13, split="pool", with_description=False)
    # a bad line in the middle: rejected as bad input, with its line, by whichever shard holds it
    lines = path.read_text().splitlines()
    lines.insert(6, '{"dataset": "Toy", "image": "nope.png"}')
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(tmp_path: Path, pool: Path, **kw) -> synthesis.SynthesisConfig:
    settings = {"max_retries": 2, "batch_size": 3, **kw}
    return synthesis.SynthesisConfig(
        input_file=str(pool),
        output_file=str(tmp_path / "out" / "synth.jsonl"),
        rejected_file=str(tmp_path / "out" / "synth_rejected.jsonl"),
        work_dir=str(tmp_path / "work"),
        **settings,
    )


def _synth_sharded(cfg, backend_for, shards: int, model_id: str = "m"):
    for i in range(shards):
        synthesis.run(
            replace(cfg, shards=shards, shard=i),
            backend_for(),
            emotions=EMOS,
            model_id=model_id,
            progress=False,
        )
    return synthesis.merge(replace(cfg, shards=shards), model_id=model_id)


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_synthesis_equals_one_shard(tmp_path, pool, shards):
    one, two = tmp_path / "one", tmp_path / "many"
    base = _cfg(one, pool)
    summary, out = synthesis.run(
        base, ScriptedBackend(by_seed, batch_size=3), emotions=EMOS, model_id="m", progress=False
    )
    stats, merged = _synth_sharded(
        _cfg(two, pool), lambda: ScriptedBackend(by_seed, batch_size=2), shards
    )
    accepted = Path(out["accepted"]).read_bytes()
    assert accepted and Path(merged["accepted"]).read_bytes() == accepted
    assert Path(merged["rejected"]).read_bytes() == Path(out["rejected"]).read_bytes()
    assert (stats["read"], stats["accepted"], stats["rejected"]) == (
        summary.read,
        summary.accepted,
        summary.rejected,
    )
    assert stats["read"] == 14 and 0 < stats["accepted"] < 14
    assert stats["reject_codes"] == summary.reject_codes
    assert stats["attempts_histogram"] == summary.attempts_histogram
    # each shard wrote its own files; the slices are contiguous ranges of the input
    reads = [
        json.loads((two / "work" / f"shard-{i}-of-{shards}" / "synthesis_stats.json").read_text())[
            "read"
        ]
        for i in range(shards)
    ]
    assert sum(reads) == 14 and max(reads) - min(reads) <= 1


def test_a_shard_keeps_each_samples_line_so_its_seed(tmp_path, pool):
    """Randomness is drawn per (seed, sample key, attempt) and the key is the sample's input line
    and id: a shard reads the whole file and skips the other slices, so its keys (and seeds) are
    the 1-shard run's."""
    cfg = _cfg(tmp_path, pool)
    seen = []

    def spy(req, i):
        seen.append((req.key, req.seed))
        return by_seed(req, i)

    synthesis.run(replace(cfg, shards=2, shard=1), ScriptedBackend(spy), emotions=EMOS)
    first = dict(seen)
    assert sorted(int(k.split(":")[0]) for k in first) == list(range(8, 15))  # lines 8..14
    seen.clear()
    synthesis.run(
        replace(
            cfg,
            work_dir=str(tmp_path / "w1"),
            output_file=str(tmp_path / "a"),
            rejected_file=str(tmp_path / "r"),
        ),
        ScriptedBackend(spy),
        emotions=EMOS,
    )
    assert all(dict(seen)[k] == v for k, v in first.items())
    assert next(iter(first.values())) == sample_seed(0, next(iter(first)), 0)


def test_merge_refuses_missing_shard_and_duplicated_record(tmp_path, pool):
    cfg = _cfg(tmp_path, pool)
    _synth_sharded(cfg, lambda: ScriptedBackend(by_seed, batch_size=4), 2)
    two = replace(cfg, shards=2)
    acc1, rej1, _ = synthesis.output_paths(two, 1)
    acc0, rej0, _ = synthesis.output_paths(two, 0)
    merged = Path(cfg.output_file)
    before = merged.read_bytes()

    # a record of shard 0 also in shard 1's output (in place of one of its own)
    rows1 = rej1.read_text().splitlines() or acc1.read_text().splitlines()
    target = rej1 if rej1.read_text().strip() else acc1
    stolen = (acc0.read_text().splitlines() or rej0.read_text().splitlines())[0]
    stolen_id = json.loads(stolen)["id"]
    saved = target.read_text()
    target.write_text("\n".join([stolen, *rows1[1:]]) + "\n")
    with pytest.raises(ShardMergeError, match=f"shard 1 of 2: {stolen_id}.*appears twice"):
        synthesis.merge(two, model_id="m")
    target.write_text(saved)

    # shard 1 never finished: its output is missing
    acc1.unlink()
    with pytest.raises(
        ShardMergeError, match=r"shard 1 of 2: output missing: .*shard-1-of-2/synth.jsonl"
    ):
        synthesis.merge(two, model_id="m")
    assert merged.read_bytes() == before  # nothing written by a refused merge

    # shard outputs of another model are refused too
    with pytest.raises(ShardMergeError, match=r"shard 0 of 2: .*signature differs"):
        synthesis.merge(two, model_id="another model")


def test_a_killed_shard_resumes_alone_and_the_other_is_kept(tmp_path, pool):
    cfg = _cfg(tmp_path, pool)
    backend = lambda: ScriptedBackend(by_seed, batch_size=2)  # noqa: E731
    synthesis.run(replace(cfg, shards=2, shard=0), backend(), emotions=EMOS, model_id="m")
    with pytest.raises(synthesis.SynthesisInterruptedError):
        synthesis.run(
            replace(cfg, shards=2, shard=1),
            backend(),
            emotions=EMOS,
            model_id="m",
            stop_after=2,
            progress=False,
        )
    with pytest.raises(ShardMergeError, match="shard 1 of 2: output missing"):
        synthesis.merge(replace(cfg, shards=2), model_id="m")
    acc0, _, work0 = synthesis.output_paths(replace(cfg, shards=2), 0)
    kept = (acc0.stat().st_mtime_ns, (work0 / "journal.jsonl").read_bytes())
    summary, _ = synthesis.run(
        replace(cfg, shards=2, shard=1), backend(), emotions=EMOS, model_id="m", progress=False
    )
    assert summary.resumed >= 2  # the journaled samples are not generated again
    assert (acc0.stat().st_mtime_ns, (work0 / "journal.jsonl").read_bytes()) == kept
    stats, merged = synthesis.merge(replace(cfg, shards=2), model_id="m")
    whole, out = synthesis.run(
        replace(
            cfg,
            work_dir=str(tmp_path / "w1"),
            output_file=str(tmp_path / "a1.jsonl"),
            rejected_file=str(tmp_path / "r1.jsonl"),
        ),
        backend(),
        emotions=EMOS,
        model_id="m",
        progress=False,
    )
    assert Path(merged["accepted"]).read_bytes() == Path(out["accepted"]).read_bytes()
    assert stats["accepted"] == whole.accepted


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from facial_r1_training.models import build_tiny

    out = tmp_path_factory.mktemp("model") / "tiny"
    build_tiny(out)
    return out


def test_tiny_model_sharded_synthesis_is_byte_identical(tmp_path, pool, tiny_model):
    def backend():
        return create_backend("transformers", tiny_model, batch_size=4, max_new_tokens=12)

    one, out = synthesis.run(
        _cfg(tmp_path / "one", pool, temperature=0.9, max_retries=1),
        backend(),
        emotions=EMOS,
        model_id="tiny",
        progress=False,
    )
    stats, merged = _synth_sharded(
        _cfg(tmp_path / "two", pool, temperature=0.9, max_retries=1), backend, 2, "tiny"
    )
    assert Path(merged["rejected"]).read_bytes() == Path(out["rejected"]).read_bytes()
    assert Path(merged["accepted"]).read_bytes() == Path(out["accepted"]).read_bytes()
    assert stats["read"] == one.read == 14


TIMING = ("generation_s", "images_per_s")


def test_tiny_model_sharded_evaluation_equals_one_shard(tmp_path, tiny_model):
    test_file = write_toy_dataset(tmp_path / "data", 11, split="test")
    # one record whose image is missing: skipped (with its line) by the shard that holds it
    lines = test_file.read_text().splitlines()
    gone = json.loads(lines[7])
    (test_file.parent / gone["dataset"] / gone["image"]).unlink()

    backend = create_backend("transformers", tiny_model, batch_size=4, max_new_tokens=10)

    def run(cfg, out):
        return evaluation.evaluate(
            cfg,
            backend,
            emotions=EMOS,
            output_dir=out,
            test_file=test_file,
            model_id="tiny",
            progress=False,
        )

    cfg = evaluation.EvaluateConfig(max_new_tokens=10)
    report1, out1 = run(cfg, tmp_path / "one")
    for i in range(2):
        summary, _ = run(replace(cfg, shards=2, shard=i), tmp_path / "two")
        assert "au" not in summary and "emotion_accuracy" not in summary  # no per-shard score
    report2, out2 = evaluation.merge(
        replace(cfg, shards=2),
        emotions=EMOS,
        output_dir=tmp_path / "two",
        test_file=test_file,
        model_id="tiny",
    )
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert strip(report2) == strip(report1)
    assert report2["n"] == 10 and report2["skipped"] == 1 and report2["read"] == 11
    assert report2["test_set_fingerprint"] == report1["test_set_fingerprint"]
    h1, h2 = evaluation.headline(report1), evaluation.headline(report2)
    assert {k: v for k, v in h2.items() if k not in TIMING} == {
        k: v for k, v in h1.items() if k not in TIMING
    }
    preds = Path(out1["predictions"]).read_bytes()
    assert Path(out2["predictions"]).read_bytes() == preds

    # a shard's predictions missing, or a record predicted twice: refused, naming both
    shard1 = tmp_path / "two" / "shard-1-of-2" / "predictions.jsonl"
    rows = shard1.read_text().splitlines()
    first0 = (tmp_path / "two" / "shard-0-of-2" / "predictions.jsonl").read_text().splitlines()[0]
    shard1.write_text("\n".join([first0, *rows[1:]]) + "\n")
    dup = json.loads(first0)["id"]
    with pytest.raises(ShardMergeError, match=f"shard 1 of 2: {dup} .*appears twice"):
        evaluation.merge(
            replace(cfg, shards=2),
            emotions=EMOS,
            output_dir=tmp_path / "two",
            test_file=test_file,
            model_id="tiny",
        )
    shard1.unlink()
    with pytest.raises(ShardMergeError, match="shard 1 of 2: output missing"):
        evaluation.merge(
            replace(cfg, shards=2),
            emotions=EMOS,
            output_dir=tmp_path / "two",
            test_file=test_file,
            model_id="tiny",
        )


@pytest.mark.parametrize("verb", ["synthesize", "evaluate"])
def test_shards_without_a_slice_or_merge_is_refused_before_any_work(tmp_path, verb, capsys):
    from facial_r1_core.cli import main as cli_main

    argv = [verb, str(tmp_path / "missing.jsonl"), "--model", str(tmp_path), "--shards", "3"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "--shards 3 needs --shard I (0..2" in err and "--merge" in err
    assert cli_main([*argv, "--shard", "1", "--merge"]) == 2
    assert "--shard and --merge exclude each other" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no run, no store, no output
