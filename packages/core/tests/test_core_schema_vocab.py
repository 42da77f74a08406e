"""Record schema, vocabularies, prompts and profiles."""

import json

import pytest
from facial_r1_core.config import ConfigError, apply_overrides, load_profile
from facial_r1_core.prompts import error_block, sft_prompt, synthesis_prompt
from facial_r1_core.schema import (
    Record,
    RecordError,
    iter_records_lenient,
    read_records,
    record_id,
    write_jsonl,
)
from facial_r1_core.vocab import (
    AU_NAMES,
    EMOTIONS,
    PROMPT_AUS,
    UnknownLabelError,
    normalize_au,
    normalize_emotion,
)


def row(**overrides):
    data = {
        "dataset": "RAF-DB",
        "image": "train_00001_aligned.jpg",
        "question": "q",
        "AUs": ["AU04"],
        "labels": ["Angry"],
        "description": "",
        "meta_info": {"raw_label": 6},
    }
    data.update(overrides)
    return data


def test_vocabularies():
    assert len(PROMPT_AUS) == 30
    assert {"AU8", "AU33", "AU34", "AU37", "AU38", "AU39"} <= set(AU_NAMES)
    assert set(EMOTIONS) == {
        "anger",
        "disgust",
        "fear",
        "happiness",
        "neutral",
        "sadness",
        "surprise",
        "contempt",
    }
    for spelling, label in [
        ("angry", "anger"),
        ("Happy", "happiness"),
        ("SAD", "sadness"),
        ("Surprised", "surprise"),
        ("fearful", "fear"),
        ("Disgusted", "disgust"),
    ]:
        assert normalize_emotion(spelling) == label
    with pytest.raises(UnknownLabelError, match="known labels: anger, disgust"):
        normalize_emotion("bored")
    assert normalize_au("AU 45") == "AU45"  # unknown AU numbers are kept, never a crash


def test_record_roundtrip_and_normalisation(tmp_path):
    path = tmp_path / "RAF-DB.jsonl"
    write_jsonl(path, [row(), row(image="b.jpg", AUs=[], labels=[])])
    records = list(read_records(path))
    assert records[0].AUs == ["AU4"] and records[0].labels == ["anger"]
    assert records[0].id == record_id("RAF-DB", "train_00001_aligned.jpg", "q")
    assert records[1].AUs == [] and records[1].labels == []  # empty = not annotated
    assert records[0].image_path(tmp_path) == tmp_path / "RAF-DB" / "train_00001_aligned.jpg"


@pytest.mark.parametrize(
    "bad, field",
    [
        (row(image="../x.jpg"), "image"),
        (row(image="/etc/passwd"), "image"),
        (row(image="a\\b.jpg"), "image"),
        (row(labels=["bored"]), "labels"),
        (row(AUs=["smile"]), "AUs"),
        (row(AUs={"AU4": 1}), "AUs"),
        (row(AUs=["AU99"]), "AUs"),
        (row(meta_info=[1]), "meta_info"),
        ({k: v for k, v in row().items() if k != "question"}, "question"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, bad, field):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(row()) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError) as info:
        list(read_records(path))
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert str(err).startswith(f"{path}:3: field '{field}'")


def test_lenient_reader_reconciles(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join([json.dumps(row()), "{broken", json.dumps(row(image="../a"))]) + "\n")
    results = list(iter_records_lenient(path))
    assert [r.line for r in results] == [1, 2, 3]
    assert [r.record is not None for r in results] == [True, False, False]
    assert "invalid JSON" in results[1].error.reason


def test_id_check_optional():
    with pytest.raises(RecordError, match="md5"):
        Record.from_dict(row(id="abc"), check_id=True)
    assert Record.from_dict(row(id="abc")).id == "abc"


def test_atomic_write_leaves_nothing_on_crash(tmp_path):
    path = tmp_path / "out.jsonl"

    def rows():
        yield row()
        raise RuntimeError("crash mid-stage")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_prompts_render_clean_lists():
    p = sft_prompt("Q?", ["anger", "fear"])
    assert "Use a single word from anger, fear." in p and "dict_keys" not in p
    assert p.count("- AU") == 30
    s = synthesis_prompt("Q?", ["fear"], ["AU1", "AU2"], "fear", "<think>x</think>", ["a", "b"])
    assert s.startswith(p.replace("anger, fear", "fear"))
    assert "Action Units: AU1, AU2" in s and "### Previous Response Issues" in s
    assert "a; b" in error_block("prev", ["a", "b"])


def test_profiles_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("sft:\n  learning_rate: 0.001\n  max_steps: 10\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nsft:\n  max_steps: 20\n")
    cfg = load_profile(child, ["sft.learning_rate=3e-3", "grpo.beta=0.04"])
    assert cfg["sft"] == {"learning_rate": 0.003, "max_steps": 20}
    assert cfg["grpo"]["beta"] == 0.04 and cfg["profile"]["name"] == "child"
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not found"):
        load_profile(tmp_path / "missing.yaml")


from facial_r1_core.schema import check_image_path  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

path_parts = st.lists(
    st.sampled_from(["a", "b.jpg", "..", ".", "", "~x", "c d"]), min_size=1, max_size=5
)


@given(path_parts, st.booleans())
def test_accepted_image_paths_stay_inside(parts, absolute):
    raw = ("/" if absolute else "") + "/".join(parts)
    try:
        safe = check_image_path(raw)
    except ValueError:
        return
    assert not safe.startswith(("/", "~")) and ".." not in safe.split("/")
    assert "" not in safe.split("/") and "." not in safe.split("/")
