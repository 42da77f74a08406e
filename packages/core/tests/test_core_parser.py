"""Pin every rule of the one completion parser, with awkward outputs and property tests."""

import pytest
from facial_r1_core.parser import (
    answer_labels,
    completion_text,
    extract_block,
    is_format_valid,
    named_aus,
    parse_completion,
)
from hypothesis import given
from hypothesis import strategies as st

GOOD = "<think>Cheeks raised (AU6) and lip corners pulled (AU12).</think><answer>happiness</answer>"


def test_good_completion_parses_fully():
    p = parse_completion(GOOD)
    assert p.think.startswith("Cheeks raised")
    assert p.answer == "happiness"
    assert p.aus == ("AU6", "AU12")
    assert p.emotions == ("happiness",)
    assert p.format_valid and not p.negative_wording


@pytest.mark.parametrize(
    "written", ["AU4", "AU 4", "AU04", "au4", "AU-4", "Au004", "(AU4)", "AU4."]
)
def test_au_spellings_normalise(written):
    assert named_aus(f"Brows lowered {written}") == ("AU4",)


@pytest.mark.parametrize("text", ["AU100", "XAU4", "AU", "AU0", "AUX4", "BAU12"])
def test_non_codes_are_not_aus(text):
    assert named_aus(text) == ()


@pytest.mark.parametrize(
    "think, expected",
    [
        ("No brow lowering (AU4).", ()),
        ("Brows raised (AU1), not lowered (AU4).", ("AU1",)),
        ("Lips parted (AU25) but without jaw drop (AU26).", ("AU25",)),
        ("AU9 is absent; AU10 present.", ("AU10",)),
        ("Absence of AU12. Cheeks raised (AU6).", ("AU6",)),
        ("The face lacks AU15; neither AU1 nor AU2 show.", ()),
        ("Lacking tension AU23, lips pressed (AU24).", ("AU24",)),
        ("Notable brow raise (AU1).", ("AU1",)),  # 'notable' is not the word 'not'
        ("Nose wrinkled (AU9) and upper lip raised (AU10)", ("AU9", "AU10")),
    ],
)
def test_negated_codes_do_not_count(think, expected):
    assert named_aus(think) == expected


def test_aus_only_from_think_block():
    p = parse_completion("<think>Smiling.</think><answer>happiness (AU12)</answer>")
    assert p.aus == ()
    assert parse_completion("AU12 lip corners <answer>happiness</answer>").aus == ()


def test_aus_sorted_and_unique():
    assert named_aus("AU12, AU6, au 12, AU06") == ("AU6", "AU12")


@pytest.mark.parametrize(
    "text, think, answer",
    [
        ("<answer>fear</answer>", None, "fear"),
        ("<think>a</think>", "a", None),
        ("<think>a</think><think>b</think><answer>x</answer>", None, "x"),
        ("<think><think>a</think></think><answer>x</answer>", None, "x"),
        ("<think>a</think><answer>x</answer><answer>y</answer>", "a", None),
        ("</think>a<think><answer>x</answer>", None, "x"),
        ("<think></think><answer></answer>", "", ""),
    ],
)
def test_missing_repeated_nested_blocks(text, think, answer):
    assert extract_block(text, "think") == think
    assert extract_block(text, "answer") == answer


@pytest.mark.parametrize(
    "text, valid",
    [
        (GOOD, True),
        ("  \n" + GOOD + "\n ", True),
        ("<think>a</think>\n\n<answer>b</answer>", True),
        ("<think> </think><answer>b</answer>", False),
        ("<think>a</think><answer>  </answer>", False),
        ("Sure! " + GOOD, False),
        (GOOD + " Done.", False),
        ("<answer>b</answer><think>a</think>", False),
        ("<think>a</think>x<answer>b</answer>", False),
        ("<think>a<think>b</think><answer>c</answer>", False),
        ("<think>a</think><answer>b<answer>c</answer>", False),
        ("<think>a</think><answer>b</answer><answer>c</answer>", False),
        ("", False),
    ],
)
def test_format_validity(text, valid):
    assert is_format_valid(text) is valid
    assert parse_completion(text).format_valid is valid


@pytest.mark.parametrize(
    "answer, labels",
    [
        ("anger", ("anger",)),
        ("Angry.", ("anger",)),
        (" HAPPY! ", ("happiness",)),
        ("surprised", ("surprise",)),
        ("anger or fear", ("anger", "fear")),
        ("anger and disgust", ("anger", "disgust")),
        ("sad/fearful; disgusted", ("sadness", "fear", "disgust")),
        ("anger, fear", ("anger", "fear")),
        ("bewildered", ("bewildered",)),
        ("", ()),
        ("'contempt'", ("contempt",)),
    ],
)
def test_answer_labels(answer, labels):
    assert answer_labels(answer) == labels


@pytest.mark.parametrize(
    "think, negative",
    [
        ("No smile", True),
        ("This is not anger", True),
        ("without tension", True),
        ("Maybe sad", True),
        ("Nothing, knot, Notably, nobody", False),
        ("absent brows (AU4)", False),  # negates the AU, but is not forbidden wording
    ],
)
def test_negative_wording(think, negative):
    text = f"<think>{think}</think><answer>anger</answer>"
    assert parse_completion(text).negative_wording is negative


def test_conversational_completion():
    msgs = [{"role": "assistant", "content": GOOD}]
    assert parse_completion(msgs) == parse_completion(GOOD)
    assert (
        completion_text([{"role": "assistant", "content": [{"type": "text", "text": GOOD}]}])
        == GOOD
    )


def test_rejects_non_text_completion():
    with pytest.raises(TypeError):
        completion_text(42)


@given(st.text())
def test_parser_never_crashes_and_is_consistent(text):
    p = parse_completion(text)
    if p.format_valid:
        assert p.think is not None and p.think.strip()
        assert p.answer is not None and p.answer.strip()
    if p.think is None:
        assert p.aus == () and not p.negative_wording
    assert list(p.aus) == sorted(set(p.aus), key=lambda a: int(a[2:]))


aus_strategy = st.lists(st.integers(min_value=1, max_value=99), min_size=1, max_size=6, unique=True)
spellings = st.sampled_from(["AU{}", "AU {}", "AU0{}", "au{}", "AU-{}"])


@given(aus_strategy, spellings)
def test_affirmative_aus_are_all_found(numbers, spelling):
    think = " and ".join(f"feature ({spelling.format(n)})" for n in numbers)
    assert set(named_aus(think)) == {f"AU{n}" for n in numbers}
