"""One input path for every verb: the same bad-input kinds fed to every record-reading verb give
the same per-line outcome (quarantined with the reader's code by the data verbs; exit 2 with
file:line before any work by the training verbs and ``score``). Plus one test per reproduction of
the bad-input, overwrite, temporary-file and secret problems."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from facial_r1_core.cli import main
from facial_r1_core.schema import (
    BadInputError,
    IdIndex,
    InputError,
    Record,
    RecordReader,
    atomic_write,
    preflight,
    record_id,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "configs" / "tiny-cpu.yaml"
LIMIT = 4096  # FACIAL_R1_MAX_LINE_BYTES for these tests (the default is 1 MiB)
GOOD_TEXT = "<think>Brows lowered (AU4), lids tightened (AU7).</think><answer>anger</answer>"


def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (90, 40, 40)).save(path)


def good_records(n: int = 4) -> list[Record]:
    return [
        Record.create(
            dataset="D",
            image=f"g{i}.png",
            question="Which emotion?",
            AUs=["AU4", "AU7"],
            labels=["anger"],
            description=GOOD_TEXT,
        )
        for i in range(n)
    ]


def bad_line(kind: str) -> bytes:
    """One line of each bad-input kind; the key is the reader's code."""
    base = {"dataset": "D", "image": "b.png", "question": "Which emotion?", "labels": ["anger"]}
    base["AUs"], base["description"] = ["AU4"], GOOD_TEXT
    if kind == "invalid_json":
        return b'{"dataset": "D", "image": '
    if kind == "invalid_utf8":
        return json.dumps(base).encode().replace(b"b.png", b"b\xff.png")
    if kind == "wrong_type":
        return json.dumps({**base, "AUs": {"AU4": 1}}).encode()
    if kind == "unknown_label":
        return json.dumps({**base, "labels": ["bored"]}).encode()
    if kind == "impossible_au":
        return json.dumps({**base, "AUs": ["AU99"]}).encode()
    if kind == "dotdot_path":
        return json.dumps({**base, "image": "../escape.png"}).encode()
    if kind == "absolute_path":
        return json.dumps({**base, "image": "/etc/passwd"}).encode()
    if kind == "symlink_out":
        return json.dumps({**base, "image": "link.png"}).encode()
    if kind == "duplicate_id":
        return good_records(1)[0].to_json().encode()
    if kind == "oversized":
        return json.dumps({**base, "description": "x" * (LIMIT + 10)}).encode()
    raise AssertionError(kind)


CODES = {
    "invalid_json": "invalid_json",
    "invalid_utf8": "invalid_utf8",
    "wrong_type": "schema_error",
    "unknown_label": "unknown_label",
    "impossible_au": "unknown_label",
    "dotdot_path": "unsafe_path",
    "absolute_path": "unsafe_path",
    "symlink_out": "unsafe_path",
    "duplicate_id": "duplicate_id",
    "oversized": "line_too_long",
}
KINDS = list(CODES)
BAD_LINE = 5  # four good records, then the bad one


def make_root(tmp_path: Path, kind: str, name: str = "D_train.jsonl") -> Path:
    """``<root>/<name>``: four good records and one bad line of ``kind``, images in place, and
    ``<root>/D/link.png`` a symlink to an image outside the root."""
    root = tmp_path / "root"
    for rec in good_records():
        png(root / "D" / rec.image)
    png(root / "D" / "b.png")
    png(tmp_path / "outside" / "secret.png")
    link = root / "D" / "link.png"
    if not link.is_symlink():
        link.symlink_to(tmp_path / "outside" / "secret.png")
    path = root / name
    body = b"".join(r.to_json().encode() + b"\n" for r in good_records())
    path.write_bytes(body + bad_line(kind) + b"\n")
    return path


@pytest.fixture(autouse=True)
def small_line_limit(monkeypatch, tmp_path):
    monkeypatch.setenv("FACIAL_R1_MAX_LINE_BYTES", str(LIMIT))
    monkeypatch.setenv("FACIAL_R1_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# -- the data verbs: quarantine with the reader's code ------------------------------------------


def quarantined(report: dict) -> dict:
    lines = Path(report["quarantine_file"]).read_text().splitlines()
    return {json.loads(x)["source"]["line"]: json.loads(x)["reason"] for x in lines}


def run_validate(path: Path, kind: str) -> None:
    from facial_r1_data.validate import validate

    report = validate(path)
    assert report["errors_by_kind"] == {CODES[kind]: 1}
    assert [(e["line"], e["error"]) for e in report["examples"]] == [(BAD_LINE, CODES[kind])]
    assert main(["data", "validate", str(path), "--no-progress"]) == 1


def run_clean(path: Path, kind: str) -> None:
    from facial_r1_data.clean import clean

    out = path.with_name("D_clean.jsonl")
    report = clean(path, out)
    assert quarantined(report) == {BAD_LINE: CODES[kind]}
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [
        r.id for r in good_records()
    ]


def run_balance(path: Path, kind: str) -> None:
    from facial_r1_data.balance import balance

    report = balance(path, path.with_name("D_bal.jsonl"), plot=False)
    assert quarantined(report) == {BAD_LINE: CODES[kind]}
    assert report["written"] == 4 and report["read"] == 5


def run_mix(path: Path, kind: str) -> None:
    from facial_r1_data.mix import mix

    report = mix([(path, "all")], path.with_name("D_mix.jsonl"))
    assert quarantined(report) == {BAD_LINE: CODES[kind]}
    assert report["written"] == 4


def run_convert(path: Path, kind: str) -> None:
    from facial_r1_data.convert import convert

    report = convert("fea20k", path.parent, path.parent.parent / "converted", "all")
    assert quarantined(report) == {BAD_LINE: CODES[kind]}
    out = Path(report["jsonl"]).read_text().splitlines()
    assert len(out) == 4
    assert not (path.parent.parent / "converted" / "D" / "link.png").exists()


# balance and mix never open images, so a symlinked image is not theirs to judge
DATA_VERBS = {
    "validate": (run_validate, KINDS),
    "clean": (run_clean, KINDS),
    "balance": (run_balance, [k for k in KINDS if k != "symlink_out"]),
    "mix": (run_mix, [k for k in KINDS if k != "symlink_out"]),
    "convert": (run_convert, KINDS),
}


# -- the training verbs and score: exit 2 naming file:line, before any work ---------------------


def stage_args(verb: str, path: Path, out: Path) -> list[str]:
    common = ["--config", str(PROFILE), "--no-mlflow"]
    if verb in ("sft", "grpo"):
        return [verb, "--train-file", str(path), "--output-dir", str(out), *common]
    if verb == "synthesize":
        return [verb, "--input", str(path), "--output", str(out / "s.jsonl"), "--model", "m"]
    if verb == "filter":
        return [verb, "--input", str(path), "--output", str(out / "grown.jsonl"), *common]
    if verb == "evaluate":
        return [verb, "--test-file", str(path), "--output-dir", str(out), "--model", "m"]
    raise AssertionError(verb)


TRAINING_VERBS = ["sft", "grpo", "synthesize", "filter", "evaluate"]
SCORE_KINDS = ["invalid_json", "invalid_utf8", "wrong_type", "unknown_label", "impossible_au"]
SCORE_KINDS.append("oversized")  # paths and ids are not part of a completion line

TABLE = [(verb, kind) for verb, (_, kinds) in DATA_VERBS.items() for kind in kinds]
TABLE += [(verb, kind) for verb in TRAINING_VERBS for kind in KINDS]
TABLE += [("score", kind) for kind in SCORE_KINDS]


@pytest.mark.parametrize("verb, kind", TABLE)
def test_every_verb_gives_the_same_outcome_for_each_bad_input_kind(verb, kind, tmp_path, capsys):
    path = make_root(tmp_path, kind)
    if verb in DATA_VERBS:
        DATA_VERBS[verb][0](path, kind)
        return
    out = tmp_path / "out"
    if verb == "score":
        args = ["score", str(path), "--output", str(out / "scored.jsonl")]
    else:
        args = stage_args(verb, path, out)
        if verb in ("synthesize", "evaluate"):
            args += ["--config", str(PROFILE), "--no-mlflow"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path}:{BAD_LINE}:" in err, err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing was done


def test_table_covers_every_kind_for_every_verb():
    per_verb: dict[str, int] = {}
    for verb, _ in TABLE:
        per_verb[verb] = per_verb.get(verb, 0) + 1
    assert per_verb == {
        "validate": 10,
        "clean": 10,
        "balance": 9,
        "mix": 9,
        "convert": 10,
        "sft": 10,
        "grpo": 10,
        "synthesize": 10,
        "filter": 10,
        "evaluate": 10,
        "score": 6,
    }


def test_skip_bad_records_prints_and_counts(tmp_path, capsys):
    path = make_root(tmp_path, "unknown_label")
    with pytest.raises(BadInputError) as info:
        preflight([path])
    assert info.value.total == 1 and f"{path}:{BAD_LINE}: field 'labels'" in str(info.value)
    counts = preflight([path], skip_bad=True, echo=print)
    assert counts == {"read": 5, "bad": 1}
    assert "skipped 1 bad record(s) of 5" in capsys.readouterr().out


# -- reproductions ---------------------------------------------------------------------------


def test_synthesize_refuses_to_overwrite_its_input_even_through_a_hard_link(tmp_path):
    from facial_r1_training.generation import ScriptedBackend
    from facial_r1_training.synthesis import SynthesisConfig, run

    path = make_root(tmp_path, "duplicate_id")
    path.write_text("".join(r.to_json() + "\n" for r in good_records()))
    before = path.read_bytes()
    twin = tmp_path / "twin.jsonl"
    os.link(path, twin)
    for output in (path, twin):
        cfg = SynthesisConfig(
            input_file=str(path), output_file=str(output), work_dir=str(tmp_path / "w")
        )
        with pytest.raises(InputError, match="never overwrites an input"):
            run(cfg, ScriptedBackend(lambda r, i: GOOD_TEXT), emotions=["anger"], progress=False)
    assert path.read_bytes() == before


def test_score_refuses_to_overwrite_its_input(tmp_path, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"completion": GOOD_TEXT, "AUs": ["AU4"], "labels": "anger"}) + "\n")
    before = src.read_bytes()
    assert main(["score", str(src), "--output", str(src)]) == 2
    assert "never overwrites an input" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_clean_balance_mix_refuse_output_equal_to_input(tmp_path, capsys):
    path = make_root(tmp_path, "duplicate_id")
    for args in (
        ["data", "clean", str(path), "--out", str(path), "--no-images"],
        ["data", "balance", str(path), "--out", str(path)],
        ["data", "mix", "--take", f"{path}=all", "--out", str(path)],
    ):
        assert main(args) == 2
        assert "never overwrites an input" in capsys.readouterr().err


def test_ids_sharing_a_16_hex_prefix_are_distinct(tmp_path):
    from facial_r1_data.clean import clean

    prefix = "0123456789abcdef"
    rows = []
    for i in range(300):
        rec = Record.create(dataset="D", image=f"{i}.png", question="q", labels=["fear"])
        rec.id = prefix + f"{i:016x}"
        rows.append(rec.to_json())
    src = tmp_path / "ids.jsonl"
    src.write_text("\n".join(rows) + "\n")
    report = clean(src, tmp_path / "out.jsonl", images=False)
    assert report["kept"] == 300 and report["quarantined"] == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="0123456789abcdefABCDEF", min_size=30, max_size=33), max_size=60))
def test_id_index_is_an_exact_set(ids):
    index = IdIndex()
    seen: set[str] = set()
    for rid in ids:
        assert index.add(rid) == (rid not in seen)
        seen.add(rid)
    assert len(index) == len(seen) and all(rid in index for rid in seen)


def test_score_string_fields_and_invalid_utf8_never_trace(tmp_path, capsys):
    src, out = tmp_path / "c.jsonl", tmp_path / "o.jsonl"
    src.write_text(json.dumps({"completion": GOOD_TEXT, "AUs": "AU4", "labels": "Angry"}) + "\n")
    assert main(["score", str(src), "--output", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["AUs"] == ["AU4"] and row["labels"] == ["anger"]
    src.write_bytes(b'{"completion": "\xff", "AUs": []}\n')
    assert main(["score", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:1: invalid UTF-8" in err and "Traceback" not in err


def test_one_au_rule_everywhere(tmp_path):
    """A real FACS code beyond the prompt's list is kept by every verb, AU99 rejected by every
    verb with the same message."""
    from facial_r1_core.score import score_row
    from facial_r1_data.clean import clean
    from facial_r1_data.validate import validate

    message = "AU99 is not a FACS Action Unit"
    path = make_root(tmp_path, "impossible_au")
    assert message in validate(path)["examples"][0]["message"]
    q = Path(clean(path, tmp_path / "c.jsonl")["quarantine_file"]).read_text()
    assert message in q
    with pytest.raises(ValueError, match=message):
        score_row({"completion": GOOD_TEXT, "AUs": ["AU99"]})
    rec = Record.from_dict({"dataset": "D", "image": "a.png", "question": "q", "AUs": ["AU45"]})
    assert rec.AUs == ["AU45"]


def test_string_label_is_written_as_a_list(tmp_path):
    from facial_r1_data.clean import clean

    src = tmp_path / "s.jsonl"
    src.write_text(
        json.dumps({"dataset": "D", "image": "a.png", "question": "q", "labels": "Happy"})
    )
    clean(src, tmp_path / "out.jsonl", images=False)
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["labels"] == ["happiness"]
    assert row["id"] == record_id("D", "a.png", "q") and set(row) >= {"AUs", "meta_info"}


def test_ten_megabyte_line_is_reported_not_parsed(tmp_path, monkeypatch):
    from facial_r1_data.clean import clean

    monkeypatch.delenv("FACIAL_R1_MAX_LINE_BYTES")  # the documented default: 1 MiB
    src = tmp_path / "big.jsonl"
    good = good_records(1)[0]
    huge = {**good.to_dict(), "image": "h.png", "description": "x" * 10_000_000}
    src.write_text(good.to_json() + "\n" + json.dumps(huge) + "\n" + good.to_json() + "\n")
    report = clean(src, tmp_path / "out.jsonl", images=False)
    assert quarantined(report) == {2: "line_too_long", 3: "duplicate_id"}
    detail = Path(report["quarantine_file"]).read_text().splitlines()[0]
    assert "longer than the limit of 1048576 bytes" in detail


def test_reader_reports_every_line_never_raises_on_bytes(tmp_path):
    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.binary(max_size=60), max_size=8))
    def check(lines):
        path = tmp_path / "fuzz.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        results = list(RecordReader(max_bytes=40).read(path))
        non_blank = [i + 1 for i, x in enumerate(lines) if x.strip() and b"\n" not in x]
        if all(b"\n" not in x and b"\r" not in x for x in lines):
            assert [r.line for r in results] == non_blank
        for r in results:
            assert r.ok or (r.error.line == r.line and r.error.code)

    check()


def test_killed_runs_leave_nothing_and_outputs_follow_the_umask(tmp_path):
    from facial_r1_core.schema import temp_path_for

    target = tmp_path / "out.jsonl"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    stale = temp_path_for(target).name.replace(f"-{os.getpid()}-", f"-{dead_pid}-")
    (tmp_path / stale).write_bytes(b"x" * 1000)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alive = temp_path_for(target).name.replace(f"-{os.getpid()}-", f"-{live.pid}-")
        (tmp_path / alive).write_bytes(b"y")
        old = os.umask(0o027)
        try:
            with atomic_write(target) as handle:
                handle.write("ok\n")
        finally:
            os.umask(old)
        assert not (tmp_path / stale).exists()  # a dead writer's leftover is swept
        assert (tmp_path / alive).exists()  # a live writer's temporary is left alone
        assert target.stat().st_mode & 0o777 == 0o640
    finally:
        live.kill()
        live.wait()
    # a crash inside the block leaves neither the target nor a temporary
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "crash.jsonl") as handle:
        handle.write("partial")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir() if "crash" in p.name) == []


# -- secrets ------------------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    seen: list = []  # noqa: RUF012 - set per server
    redirect_to = ""

    def do_POST(self):
        self.seen.append(self.headers.get("Authorization"))
        if self.redirect_to:
            self.send_response(307)
            self.send_header("Location", self.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"choices": [{"message": {"content": '{"score": 7}'}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _server(redirect_to: str = ""):
    handler = type("H", (_Recorder,), {"seen": [], "redirect_to": redirect_to})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


def test_keys_never_follow_a_redirect_to_another_host(monkeypatch, tmp_path):
    from facial_r1_data.teacher_openai import OpenAISettings, OpenAITeacher, TeacherError
    from facial_r1_training.judge import JudgeClient, JudgeConfig

    other, other_h = _server()
    first, first_h = _server(f"http://localhost:{other.server_port}/v1/chat/completions")
    try:
        monkeypatch.setenv("FACIAL_R1_JUDGE_API_KEY", "sk-judge")
        monkeypatch.setenv("FACIAL_R1_TEACHER_API_KEY", "sk-teacher")
        base = f"http://127.0.0.1:{first.server_port}/v1"
        client = JudgeClient(JudgeConfig(base_url=base, model="m", retries=0))
        result = client.score("a", "b")
        assert result.score is None and "refused" in result.error
        img = tmp_path / "f.png"
        png(img)
        teacher = OpenAITeacher(OpenAISettings(base_url=base, model="m", api_key="sk-teacher"))
        with pytest.raises(TeacherError, match="refused"):
            teacher.complete("p", img)
        assert first_h.seen == ["Bearer sk-judge", "Bearer sk-teacher"]
        assert other_h.seen == []  # the key never reached the other host
        # the same host answers: the key is sent there
        direct = JudgeClient(
            JudgeConfig(base_url=f"http://127.0.0.1:{other.server_port}/v1", model="m", retries=0)
        )
        assert direct.score("a", "b").score == 7.0 and other_h.seen == ["Bearer sk-judge"]
    finally:
        first.shutdown()
        other.shutdown()


def test_a_profile_cannot_choose_which_variable_is_sent(monkeypatch):
    from facial_r1_core.config import ConfigError, from_section
    from facial_r1_core.endpoints import EndpointError, check_url
    from facial_r1_training.judge import JudgeClient, JudgeConfig

    with pytest.raises(ConfigError):
        from_section(JudgeConfig, {"api_key_env": "AWS_SECRET_ACCESS_KEY"}, name="evaluate.judge")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws")
    monkeypatch.delenv("FACIAL_R1_JUDGE_API_KEY", raising=False)
    assert JudgeClient(JudgeConfig(base_url="https://x.example/v1", model="m")).api_key == ""
    with pytest.raises(EndpointError, match="plain http"):
        check_url("http://api.example.com/v1", "sk-1")
    check_url("http://127.0.0.1:8000/v1", "sk-1")  # a local server may use http


def test_convert_quarantines_an_impossible_au_from_any_converter(tmp_path):
    """Converters build records leniently; the runner's core check quarantines AU99 with the
    same message as every other verb (never a crash, never written)."""
    from facial_r1_data.convert import convert

    src = tmp_path / "src"
    src.mkdir()
    (src / "m.csv").write_text("image,label,aus\na.png,happy,AU6|AU12\nb.png,sad,AU99\n")
    report = convert(
        "generic", src, tmp_path / "out", "all", name="X", manifest=src / "m.csv", images="none"
    )
    assert report["written"] == 1 and report["quarantined_by_reason"] == {"unknown_label": 1}
    assert "AU99 is not a FACS Action Unit" in Path(report["quarantine_file"]).read_text()


def test_convert_refuses_to_write_over_its_manifest(tmp_path):
    from facial_r1_data.convert import convert

    out = tmp_path / "out"
    out.mkdir()
    manifest = out / "X.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "label": "happy"}) + "\n")
    before = manifest.read_bytes()
    with pytest.raises(InputError, match="never overwrites an input"):
        convert("generic", out, out, "all", name="X", manifest=manifest, images="none")
    assert manifest.read_bytes() == before
