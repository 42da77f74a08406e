"""Synthesis: batched generate-check-retry, bad input, resume from the journal, tiny-model run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from facial_r1_core.schema import Record
from facial_r1_training.generation import GenerationRequest, ScriptedBackend
from facial_r1_training.synthesis import (
    ROUND_BATCHES,
    Journal,
    JournalLockedError,
    JournalMismatchError,
    SynthesisConfig,
    SynthesisInterruptedError,
    run,
)
from PIL import Image

EMOS = ["anger", "happiness", "sadness", "surprise"]
PROTOS = {
    "anger": ["AU4", "AU5", "AU7", "AU24"],
    "happiness": ["AU6", "AU12"],
    "sadness": ["AU1", "AU4", "AU15"],
    "surprise": ["AU1", "AU2", "AU5", "AU26"],
}
_GT = re.compile(
    r"MUST identify these specific Action Units: (.*)\nAnd your final answer MUST be this exact "
    r"emotion: (.*)"
)


def make_dataset(root: Path, n: int, name: str = "Faces") -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        emo = EMOS[i % len(EMOS)]
        Image.new("RGB", (56, 56), (40 * (i % 6), 120, 200)).save(root / name / f"{i}.png")
        rec = Record.create(
            dataset=name,
            image=f"{i}.png",
            question="How does this person feel?",
            AUs=PROTOS[emo],
            labels=[emo],
        )
        rows.append(rec.to_json())
    path = root / f"{name}_pool.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def ideal(req: GenerationRequest) -> str:
    aus, emo = _GT.search(req.prompt).groups()
    named = ", ".join(f"feature ({a})" for a in aus.split(", "))
    return f"<think>The face shows {named}, which indicates {emo}.</think><answer>{emo}</answer>"


def wrong_first(req: GenerationRequest, _i: int) -> str:
    if "### Previous Response Issues" not in req.prompt:
        return "<think>Brows lowered (AU4).</think><answer>fear</answer>"
    return ideal(req)


def cfg_for(tmp_path: Path, inp: Path, **kw) -> SynthesisConfig:
    return SynthesisConfig(input_file=str(inp), work_dir=str(tmp_path / "work"), **kw)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_retry_with_error_block_then_accept(tmp_path):
    inp = make_dataset(tmp_path / "data", 10)
    backend = ScriptedBackend(wrong_first, batch_size=4)
    summary, out = run(
        cfg_for(tmp_path, inp, max_retries=2, round_size=4), backend, emotions=EMOS, progress=False
    )
    assert (summary.read, summary.accepted, summary.rejected) == (10, 10, 0)
    accepted = read_jsonl(Path(out["accepted"]))
    assert len(accepted) == 10 and len({r["id"] for r in accepted}) == 10
    assert all(r["meta_info"]["synthesis"]["attempts"] == 2 for r in accepted)
    assert all(r["description"].startswith("<think>") for r in accepted)
    # 20 generations in full rounds of 4 (retries ride along with new samples); only the tail
    # (the last two samples' first try and retry) runs in a smaller round
    assert summary.generated == sum(backend.batch_sizes) == 20
    assert backend.batch_sizes == [4, 4, 4, 4, 2, 2]
    assert read_jsonl(Path(out["rejected"])) == []
    # by default a round holds ROUND_BATCHES x batch_size samples: here every first try, then
    # every retry
    again = ScriptedBackend(wrong_first, batch_size=4)
    run(cfg_for(tmp_path / "b", inp, max_retries=2), again, emotions=EMOS, progress=False)
    assert ROUND_BATCHES * again.batch_size >= 10 and again.batch_sizes == [10, 10]


def test_retry_prompt_carries_previous_response_and_reasons(tmp_path):
    inp = make_dataset(tmp_path / "data", 1)
    prompts: list[str] = []

    def script(req, i):
        prompts.append(req.prompt)
        return wrong_first(req, i)

    run(
        cfg_for(tmp_path, inp, temperature=0.5, temperature_step=0.25),
        ScriptedBackend(script),
        emotions=EMOS,
        progress=False,
    )
    assert "Previous Response Issues" not in prompts[0]
    assert "Brows lowered (AU4)." in prompts[1] and "wrong emotion: answered fear" in prompts[1]


def test_retries_exhausted_are_rejected_with_reasons(tmp_path):
    inp = make_dataset(tmp_path / "data", 5)
    temps: list[float] = []

    def never(req, _i):
        temps.append(req.temperature)
        return "I think it is anger."

    cfg = cfg_for(
        tmp_path, inp, max_retries=3, temperature=0.6, temperature_step=0.2, max_temperature=1.0
    )
    summary, out = run(cfg, ScriptedBackend(never, batch_size=8), emotions=EMOS, progress=False)
    assert (summary.accepted, summary.rejected) == (0, 5)
    rows = read_jsonl(Path(out["rejected"]))
    assert all(r["attempts"] == 4 for r in rows)
    assert all("bad_format" in r["codes"] and r["reasons"] for r in rows)
    assert rows[0]["last_completion"] == "I think it is anger."
    assert sorted(set(temps)) == pytest.approx([0.6, 0.8, 1.0])
    assert read_jsonl(Path(out["accepted"])) == []


def test_bad_input_rejected_with_reason_never_crashes(tmp_path):
    root = tmp_path / "data"
    inp = make_dataset(root, 2)
    (root / "Faces" / "broken.png").write_bytes(b"not a png")
    extra = [
        Record.create(
            dataset="Faces", image="missing.png", question="q", AUs=["AU4"], labels=["anger"]
        ).to_json(),
        Record.create(
            dataset="Faces", image="broken.png", question="q", AUs=["AU4"], labels=["anger"]
        ).to_json(),
        Record.create(dataset="Faces", image="0.png", question="other q").to_json(),
        '{"dataset": "Faces", "image": "0.png"',
    ]
    with open(inp, "a") as handle:
        handle.write("\n".join(extra) + "\n")
    summary, out = run(
        cfg_for(tmp_path, inp),
        ScriptedBackend(lambda r, i: ideal(r)),
        emotions=EMOS,
        progress=False,
    )
    assert (summary.read, summary.accepted, summary.rejected) == (6, 2, 4)
    rows = {r["line"]: r for r in read_jsonl(Path(out["rejected"]))}
    assert rows[3]["codes"] == ["image_missing"] and "missing.png" in rows[3]["reasons"][0]
    assert rows[4]["codes"] == ["image_undecodable"] and "broken.png" in rows[4]["reasons"][0]
    assert rows[5]["codes"] == ["no_labels"]
    assert rows[6]["codes"] == ["bad_record"] and "invalid JSON" in rows[6]["reasons"][0]
    assert rows[6]["record"] is None and rows[6]["raw"].startswith('{"dataset"')


def test_resume_after_interruption_no_duplicates(tmp_path):
    inp = make_dataset(tmp_path / "data", 12)
    cfg = cfg_for(tmp_path, inp, max_retries=2, round_size=4)
    first = ScriptedBackend(wrong_first, batch_size=4)
    with pytest.raises(SynthesisInterruptedError):
        run(cfg, first, emotions=EMOS, stop_after=5, progress=False)
    journal = tmp_path / "work" / "journal.jsonl"
    done_before = len(journal.read_text().splitlines()) - 1
    assert 5 <= done_before < 12
    # simulate a kill in the middle of a write: a torn last line
    with open(journal, "a") as handle:
        handle.write('{"key": "99:x", "status": "acc')
    second = ScriptedBackend(wrong_first, batch_size=4)
    summary, out = run(cfg, second, emotions=EMOS, progress=False)
    assert summary.resumed == done_before
    assert (summary.read, summary.accepted, summary.rejected) == (12, 12, 0)
    ids = [r["id"] for r in read_jsonl(Path(out["accepted"]))]
    assert len(ids) == len(set(ids)) == 12
    # the second run generated only for unfinished samples (2 attempts each)
    assert second.requests_seen == 2 * (12 - done_before)
    # a third run finds everything done and generates nothing
    third = ScriptedBackend(wrong_first)
    summary3, _ = run(cfg, third, emotions=EMOS, progress=False)
    assert third.requests_seen == 0 and summary3.accepted == 12


def test_journal_of_other_input_is_refused_unless_fresh(tmp_path):
    inp = make_dataset(tmp_path / "data", 3)
    cfg = cfg_for(tmp_path, inp)
    run(cfg, ScriptedBackend(lambda r, i: ideal(r)), emotions=EMOS, progress=False)
    inp.write_text(inp.read_text().splitlines()[0] + "\n")
    with pytest.raises(JournalMismatchError, match=r"journal of another run.*--fresh"):
        run(cfg, ScriptedBackend(lambda r, i: ideal(r)), emotions=EMOS, progress=False)
    summary, _ = run(
        cfg, ScriptedBackend(lambda r, i: ideal(r)), emotions=EMOS, progress=False, fresh=True
    )
    assert (summary.read, summary.accepted, summary.resumed) == (1, 1, 0)


def coin(req: GenerationRequest, _i: int) -> str:
    """Accepts or fails by the request's own seed: a stand-in for sampling."""
    if req.seed % 3 == 0:
        return "<think>Brows lowered (AU4).</think><answer>fear</answer>"
    return ideal(req)


def test_damaged_journal_lines_are_redone_never_truncate_the_rest(tmp_path):
    inp = make_dataset(tmp_path / "data", 20)
    cfg = cfg_for(tmp_path, inp, max_retries=1, round_size=4)
    _, out = run(cfg, ScriptedBackend(coin), emotions=EMOS, seed=5, progress=False)
    reference = Path(out["accepted"]).read_bytes(), Path(out["rejected"]).read_bytes()
    journal = tmp_path / "work" / "journal.jsonl"
    lines = journal.read_text().splitlines()
    assert len(lines) == 21
    lines[5] = lines[5][:40]  # a damaged line in the middle
    no_key = json.loads(lines[9])
    del no_key["key"]
    lines[9] = json.dumps(no_key)  # a line without a key
    lines.insert(12, lines[11])  # a duplicate (two writers)
    journal.write_text("\n".join(lines) + "\n" + '{"key": "torn')
    again = ScriptedBackend(coin)
    summary2, out2 = run(cfg, again, emotions=EMOS, seed=5, progress=False)
    assert summary2.journal_damaged == 4 and summary2.resumed == 18
    assert (summary2.read, summary2.accepted + summary2.rejected) == (20, 20)
    assert 2 <= again.requests_seen <= 4  # only the two dropped samples were redone
    assert (Path(out2["accepted"]).read_bytes(), Path(out2["rejected"]).read_bytes()) == reference
    # the journal was rewritten without the dropped lines
    assert Journal(journal, run_signature_of(cfg, 5), str(inp)).damaged == []


def run_signature_of(cfg, seed):
    from facial_r1_training.synthesis import run_signature

    return run_signature(cfg.input_file, cfg, "", seed)


def test_a_second_writer_is_refused(tmp_path):
    first = Journal(tmp_path / "j.jsonl", "sig", "in.jsonl")
    with pytest.raises(JournalLockedError, match=r"another synthesize run holds .*j\.jsonl"):
        Journal(tmp_path / "j.jsonl", "sig", "in.jsonl")
    first.close()
    Journal(tmp_path / "j.jsonl", "sig", "in.jsonl").close()  # free again once closed


@pytest.mark.parametrize("stop_after,round_size", [(1, 3), (7, 5), (13, 16)])
def test_interrupted_run_accepts_what_an_uninterrupted_run_accepts(
    tmp_path, stop_after, round_size
):
    inp = make_dataset(tmp_path / "data", 16)
    whole = cfg_for(tmp_path / "a", inp, max_retries=2, round_size=4)
    _, out = run(whole, ScriptedBackend(coin, batch_size=4), emotions=EMOS, seed=1, progress=False)
    cut = cfg_for(tmp_path / "b", inp, max_retries=2, round_size=round_size)
    with pytest.raises(SynthesisInterruptedError):
        run(
            cut, ScriptedBackend(coin), emotions=EMOS, seed=1, stop_after=stop_after, progress=False
        )
    cut.round_size = 2  # resumed with yet another batching
    _, out2 = run(cut, ScriptedBackend(coin), emotions=EMOS, seed=1, progress=False)
    for name in ("accepted", "rejected"):
        assert Path(out2[name]).read_bytes() == Path(out[name]).read_bytes(), name


def test_tiny_model_samples_do_not_depend_on_batching(tmp_path, tiny_model_dir):
    from facial_r1_training.generation import create_backend

    inp = make_dataset(tmp_path / "data", 10)
    outs = []
    for i, (batch, stop) in enumerate([(8, None), (3, 4)]):
        cfg = cfg_for(tmp_path / str(i), inp, max_retries=1, max_new_tokens=12, temperature=0.9)
        cfg.output_file = str(tmp_path / f"acc{i}.jsonl")
        cfg.rejected_file = str(tmp_path / f"rej{i}.jsonl")
        backend = create_backend(
            "transformers", tiny_model_dir, batch_size=batch, max_new_tokens=12
        )
        if stop is not None:
            with pytest.raises(SynthesisInterruptedError):
                run(cfg, backend, emotions=EMOS, seed=3, stop_after=stop, progress=False)
            backend.batch_size = 5
        run(cfg, backend, emotions=EMOS, seed=3, progress=False)
        outs.append((Path(cfg.output_file).read_bytes(), Path(cfg.rejected_file).read_bytes()))
    assert outs[0] == outs[1]
    assert outs[0][0].count(b"\n") + outs[0][1].count(b"\n") == 10


def test_journal_refuses_duplicate_keys(tmp_path):
    journal = Journal(tmp_path / "j.jsonl", "sig", "in.jsonl")
    journal.append([{"key": "1:a", "line": 1, "status": "rejected"}])
    with pytest.raises(AssertionError, match="journaled twice"):
        journal.append([{"key": "1:a", "line": 1, "status": "rejected"}])
    journal.close()


def test_tiny_model_cli_run_reconciles(tmp_path, monkeypatch, tiny_model_dir):
    from facial_r1_core.cli import main

    inp = make_dataset(tmp_path / "data", 6)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    result = tmp_path / "result.json"
    code = main(
        [
            "synthesize",
            "--config",
            str(Path(__file__).parents[3] / "configs" / "tiny-cpu.yaml"),
            str(inp),
            "--model",
            str(tiny_model_dir),
            "--result",
            str(result),
            "--set",
            "synthesize.max_retries=1",
            "--set",
            "synthesize.max_new_tokens=16",
            "--set",
            "synthesize.batch_size=4",
            "--set",
            f"synthesize.work_dir={tmp_path}/work",
        ]
    )
    assert code == 0
    data = json.loads(result.read_text())
    m = data["metrics"]
    assert data["stage"] == "synthesize" and data["mlflow_run_id"]
    assert m["read"] == 6 and m["accepted"] + m["rejected"] == 6
    rejected = read_jsonl(Path(data["outputs"]["rejected"]))
    accepted = read_jsonl(Path(data["outputs"]["accepted"]))
    assert len(rejected) + len(accepted) == 6
    assert all(r["attempts"] == 2 and r["reasons"] for r in rejected)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from facial_r1_training.models import build_tiny

    out = tmp_path_factory.mktemp("model") / "tiny"
    build_tiny(out)
    return out


@pytest.mark.parametrize("profile", ["tiny-cpu.yaml", "qwen2.5-vl-7b.yaml"])
def test_profiles_have_valid_synthesis_filter_evaluate_sections(profile):
    from facial_r1_core.config import from_section, load_profile
    from facial_r1_training.evaluation import EvaluateConfig
    from facial_r1_training.filtering import BALANCE_MODES, FilterConfig
    from facial_r1_training.generation import BACKENDS

    cfg = load_profile(Path(__file__).parents[3] / "configs" / profile)
    syn = from_section(SynthesisConfig, cfg["synthesize"], name="synthesize")
    flt = from_section(FilterConfig, cfg["filter"], name="filter")
    ev = from_section(EvaluateConfig, cfg["evaluate"], name="evaluate")
    assert syn.backend in BACKENDS and ev.backend in BACKENDS
    assert flt.balance in BALANCE_MODES and 0 <= flt.test_fraction < 1
    assert syn.max_retries >= 1 and syn.batch_size >= 1 and syn.max_new_tokens >= 64
    assert 0 <= syn.temperature <= syn.max_temperature
    if profile.startswith("qwen"):
        assert syn.backend == "vllm" and syn.max_retries == 5  # the reference's retry limit
