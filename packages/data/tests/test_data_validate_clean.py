"""validate and clean: every error kind, reports, exit codes, read = kept + quarantined."""

from __future__ import annotations

import json
from pathlib import Path

from facial_r1_core.schema import Record, RecordReader
from facial_r1_data.clean import clean
from facial_r1_data.validate import validate
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image


def write_img(path: Path, corrupt: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if corrupt:
        path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    else:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def make_root(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """A root with one good file and one file holding one record per problem (line -> kind)."""
    root = tmp_path / "root"
    good = [
        Record.create(dataset="D", image=f"{i}.png", question="q", labels=["happy"])
        for i in range(3)
    ]
    for rec in good:
        write_img(root / "D" / rec.image)
    (root / "D_train.jsonl").write_text("".join(r.to_json() + "\n" for r in good))
    write_img(root / "D" / "corrupt.png", corrupt=True)
    write_img(root / "D" / "noann.png")
    write_img(root / "D" / "au99.png")
    write_img(root / "D" / "badid.png")
    bad_lines = {
        1: ("invalid_json", "{oops"),
        2: ("schema_error", json.dumps({"dataset": "D", "question": "q"})),
        3: ("unsafe_path", json.dumps({"dataset": "D", "image": "../x.png", "question": "q"})),
        4: (
            "unknown_label",
            json.dumps({"dataset": "D", "image": "a.png", "question": "q", "labels": ["bored"]}),
        ),
        5: (
            "missing_image",
            Record.create(dataset="D", image="gone.png", question="q", labels=["sad"]).to_json(),
        ),
        6: (
            "corrupt_image",
            Record.create(dataset="D", image="corrupt.png", question="q", labels=["sad"]).to_json(),
        ),
        7: ("duplicate_id", good[0].to_json()),
        8: ("missing_label", Record.create(dataset="D", image="noann.png", question="q").to_json()),
        9: (
            "unknown_label",
            json.dumps({"dataset": "D", "image": "au99.png", "question": "q", "AUs": ["AU99"]}),
        ),
        10: (
            "bad_id",
            json.dumps(
                {
                    **Record.create(
                        dataset="D", image="badid.png", question="q", labels=["fear"]
                    ).to_dict(),
                    "id": "x" * 32,
                }
            ),
        ),
    }
    (root / "E.jsonl").write_text("".join(text + "\n" for _, text in bad_lines.values()))
    return root, {n: kind for n, (kind, _) in bad_lines.items()}


def test_validate_finds_every_error(tmp_path):
    root, kinds = make_root(tmp_path)
    report = validate(root, across_files=True)
    assert report["records"] == 13
    assert report["ok"] is False
    got = {(e["file"], e["line"]): e["error"] for e in report["examples"]}
    expected = {("E.jsonl", n): k for n, k in kinds.items() if k not in ("missing_label", "bad_id")}
    assert got == expected
    assert report["warnings_by_kind"] == {"id_mismatch": 1}
    strict = validate(root, strict_ids=True, across_files=True)
    assert strict["errors_by_kind"]["bad_id"] == 1
    per_file = validate(root)  # line 7 repeats an id of D_train.jsonl, not of E.jsonl
    assert "duplicate_id" not in per_file["errors_by_kind"]
    (root / "F.jsonl").write_text((root / "D_train.jsonl").read_text() * 2)
    dup = validate(root, images=False)
    assert dup["errors_by_kind"]["duplicate_id"] == 3
    assert {e["line"] for e in dup["examples"] if e["file"] == "F.jsonl"} == {4, 5, 6}
    (root / "F.jsonl").unlink()
    fast = validate(root, images=False, across_files=True)
    assert "missing_image" not in fast["errors_by_kind"]
    assert fast["errors"] == report["errors"] - 2


def test_validate_clean_root_ok_and_cli_exit_codes(tmp_path, capsys):
    from facial_r1_core.cli import main

    root, _ = make_root(tmp_path)
    (root / "E.jsonl").unlink()
    assert validate(root)["ok"] is True
    assert main(["data", "validate", str(root), "--no-progress"]) == 0
    assert (root / "_reports" / "validate.json").is_file()
    (root / "E.jsonl").write_text("{oops\n")
    assert main(["data", "validate", str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "E.jsonl:1" in err and "invalid_json" in err
    assert main(["data", "validate", str(tmp_path / "nowhere")]) == 2


def test_validate_allows_balance_copies(tmp_path):
    root = tmp_path
    rec = Record.create(dataset="D", image="a.png", question="q", labels=["sad"])
    copy = rec.to_dict()
    copy["meta_info"] = {"copy": 1}
    (root / "x.jsonl").write_text(rec.to_json() + "\n" + json.dumps(copy) + "\n")
    assert validate(root, images=False)["ok"] is True


def test_clean_quarantines_with_reasons(tmp_path):
    root, kinds = make_root(tmp_path)
    result = clean(root / "E.jsonl", root / "E_clean.jsonl")
    quarantine = [json.loads(x) for x in Path(result["quarantine_file"]).read_text().splitlines()]
    got = {q["source"]["line"]: q["reason"] for q in quarantine}
    expected = {n: k for n, k in kinds.items() if k not in ("duplicate_id", "bad_id")}
    # line 7 repeats an id of another file: within E.jsonl it is the first, so it is kept
    assert got == expected
    kept = (root / "E_clean.jsonl").read_text().splitlines()
    assert len(kept) == 2  # line 7 (first time in this file) and line 10 (id mismatch is a warning)
    assert result["read"] == result["kept"] + result["quarantined"] == 10
    assert result["statement"] == "read 10 = kept 2 + quarantined 8"
    saved = json.loads(Path(result["report_file"]).read_text())
    assert saved["reconciles"] is True
    assert (root / "E.jsonl").read_text().count("\n") == 10  # input untouched


def test_clean_one_au_rule_and_duplicates(tmp_path):
    """A real FACS code outside the prompt's list (AU45) is kept, an impossible one (AU99) is
    quarantined with the same message every verb gives; a repeated id is quarantined."""
    rec = Record.create(dataset="D", image="a.png", question="q", AUs=["AU45"])
    au99 = {"dataset": "D", "image": "b.png", "question": "q", "AUs": ["AU99"]}
    (tmp_path / "in.jsonl").write_text(
        rec.to_json() + "\n" + rec.to_json() + "\n" + json.dumps(au99) + "\n"
    )
    result = clean(tmp_path / "in.jsonl", tmp_path / "out.jsonl", images=False)
    assert result["kept"] == 1
    assert result["quarantined_by_reason"] == {"duplicate_id": 1, "unknown_label": 1}
    quarantine = Path(result["quarantine_file"]).read_text()
    assert "AU99 is not a FACS Action Unit" in quarantine


record_dicts = st.fixed_dictionaries(
    {},
    optional={
        "dataset": st.one_of(st.sampled_from(["D", "RAF-DB", " "]), st.integers()),
        "image": st.one_of(
            st.sampled_from(["a.png", "x/y.jpg", "../a", "/abs", "a\\b", "~x", "..a.png", ""]),
            st.none(),
        ),
        "question": st.sampled_from(["q", "", "Which?"]),
        "AUs": st.one_of(
            st.lists(st.sampled_from(["AU1", "au 4", "12", "AU100", "smile", 3, True, None])),
            st.text(max_size=3),
        ),
        "labels": st.one_of(
            st.lists(st.sampled_from(["happy", "Anger", "bored", 1])),
            st.sampled_from(["sad", "meh"]),
        ),
        "description": st.one_of(st.text(max_size=5), st.integers()),
        "meta_info": st.one_of(
            st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
            st.lists(st.integers(), max_size=1),
        ),
        "id": st.one_of(st.text(max_size=4), st.integers()),
    },
)


@settings(max_examples=300, deadline=None)
@given(record_dicts)
def test_reader_agrees_with_core_schema_and_normalises_once(tmp_path_factory, data):
    """The reader accepts exactly what Record.from_dict accepts; what it writes (to_json) reads
    back as the same record, already in canonical form."""
    path = tmp_path_factory.mktemp("r") / "x.jsonl"
    path.write_text(json.dumps(data) + "\n")
    [res] = list(RecordReader().read(path))
    try:
        expected = Record.from_dict(data)
    except ValueError:
        expected = None
    assert res.ok == (expected is not None)
    if expected is not None:
        assert res.record == expected
        path.write_text(res.to_json() + "\n")
        [again] = list(RecordReader().read(path))
        assert again.ok and again.canonical and again.record == expected
    else:
        assert res.code in ("schema_error", "unknown_label", "unsafe_path")
