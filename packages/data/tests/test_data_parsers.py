"""Property tests of the format parsers, whole-pipeline fuzzing, and flat memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from facial_r1_data.convert import convert
from facial_r1_data.converters.affectnet import AFFECTNET_LABELS, EXCLUDED, classify_expression
from facial_r1_data.converters.disfa import parse_label_line
from facial_r1_data.converters.faba import aus_from_text
from facial_r1_data.converters.fer2013 import parse_pixels
from facial_r1_data.converters.rafau import hash_split, parse_au_string
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

AU_NUMBERS = st.integers(1, 99)


@given(st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 255))
def test_pixels_roundtrip(seed, low, high):
    low, high = min(low, high), max(low, high)
    values = np.random.default_rng(seed).integers(low, high + 1, size=2304).tolist()
    array = parse_pixels(" ".join(map(str, values)))
    assert array.dtype == np.uint8 and array.flatten().tolist() == values


@given(st.lists(st.integers(0, 255), max_size=3000).filter(lambda v: len(v) != 2304))
@settings(max_examples=30)
def test_pixels_wrong_count_rejected(values):
    with pytest.raises(ValueError, match="2304"):
        parse_pixels(" ".join(map(str, values)))


@given(
    st.lists(
        st.tuples(st.sampled_from(["", "L", "R", "B", "T"]), AU_NUMBERS), min_size=1, max_size=8
    )
)
def test_rafau_au_string(parts):
    text = "+".join(f"{q}{n}" for q, n in parts)
    aus, qualifiers = parse_au_string(text)
    assert set(aus) == {f"AU{n}" for _, n in parts}
    assert set(qualifiers) <= set(aus)


@given(st.text(alphabet="xyz!?* ", min_size=1, max_size=6))
def test_rafau_garbage_rejected(text):
    if text.strip().lower() in ("", "null", "none", "-", "0"):
        return
    with pytest.raises(ValueError):
        parse_au_string(text)


@given(st.integers(0, 100000), st.integers(0, 5), st.sampled_from([",", ", ", "\t"]))
def test_disfa_label_line(frame, intensity, sep):
    assert parse_label_line(f"{frame}{sep}{intensity}\n") == (frame, intensity)


@given(st.integers(6, 50))
def test_disfa_intensity_out_of_range(intensity):
    with pytest.raises(ValueError):
        parse_label_line(f"1,{intensity}")


@given(st.integers(-5, 20))
def test_affectnet_codes(code):
    label, reason = classify_expression(str(code))
    if 0 <= code <= 7:
        assert label == AFFECTNET_LABELS[code] and reason == ""
    elif code in EXCLUDED:
        assert label is None and reason == "excluded_label"
    else:
        assert label is None and reason == "unknown_label"


@given(st.lists(AU_NUMBERS, max_size=6))
def test_faba_aus_from_text(numbers):
    text = " and ".join(f"AU{n} - something" for n in numbers)
    assert set(aus_from_text(text)) == {f"AU{n}" for n in numbers}


def test_hash_split_fraction():
    names = [f"{i:04d}.jpg" for i in range(4000)]
    test_share = sum(hash_split(n, 0.2) == "test" for n in names) / len(names)
    assert 0.17 < test_share < 0.23
    assert hash_split("0001.jpg", 0.2) == hash_split("0001.jpg", 0.2)


fer_rows = st.lists(
    st.one_of(
        st.tuples(
            st.integers(-1, 9),
            st.sampled_from([2304, 2304, 2304, 10]),
            st.sampled_from(["Training", "PublicTest", "PrivateTest", "Other"]),
        ),
        st.just("truncated"),
        st.just(""),
    ),
    max_size=12,
)


@given(fer_rows, st.sampled_from(["train", "val", "test", "all"]))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_fer2013_counts_always_reconcile(tmp_path, rows, split):
    lines = ["emotion,pixels,Usage"]
    for row in rows:
        if row == "truncated":
            lines.append("3,1 2 3")
        elif row == "":
            lines.append("")
        else:
            code, n, usage = row
            lines.append(f"{code},{' '.join(['9'] * n)},{usage}")
    src = tmp_path / "fer"
    src.mkdir(exist_ok=True)
    (src / "fer2013.csv").write_text("\n".join(lines) + "\n")
    report = convert("fer2013", src, tmp_path / "out", split, images="none", no_progress=True)
    assert report["read"] == report["written"] + report["quarantined"]
    skipped = sum(report["converter"]["skipped_other_splits"].values())
    assert report["read"] + skipped == sum(1 for row in rows if row != "")


def _affectnet_csv(path: Path, rows: int) -> None:
    header = (
        "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
        "expression,valence,arousal\n"
    )
    with open(path, "w") as handle:
        handle.write(header)
        for i in range(rows):
            handle.write(f'{i % 997}/{i:09d}.jpg,1,2,30,30,"1;2;3",{i % 11},0.1,-0.2\n')


def test_convert_memory_stays_flat(tmp_path, monkeypatch):
    """Peak traced memory barely grows with 6x the rows: streaming, and the duplicate-id index
    costs about 16 bytes per record (packed bytes in fixed buckets)."""
    warm = tmp_path / "warm"
    warm.mkdir()
    _affectnet_csv(warm / "training.csv", 8000)  # pays one-time growth (e.g. the intern table)
    convert("affectnet", warm, tmp_path / "ow", "train", images="none", no_progress=True)
    peaks = []
    for rows in (2000, 8000):
        src = tmp_path / f"a{rows}"
        src.mkdir()
        _affectnet_csv(src / "training.csv", rows)
        tracemalloc.start()
        report = convert(
            "affectnet", src, tmp_path / f"o{rows}", "train", images="none", no_progress=True
        )
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert report["read"] == rows == report["written"] + report["quarantined"]
    per_record = (peaks[1] - peaks[0]) / 6000
    assert per_record < 40, f"{per_record:.0f} bytes per extra record"
