"""Rewards (both variants) and the synthesis filter on the cases that matter for training."""

import pytest
from facial_r1_core.filter import REASON_CODES, check
from facial_r1_core.rewards import (
    accuracy_reward,
    accuracy_reward_reference,
    au_reward,
    au_reward_reference,
    f1_score,
    format_reward,
    reward_functions,
    score,
)
from hypothesis import given
from hypothesis import strategies as st

HAPPY = "<think>Cheeks raised (AU6), lip corners pulled (AU12).</think><answer>happiness</answer>"


def conv(text):
    return [{"role": "assistant", "content": text}]


def test_perfect_completion_scores_three_in_both_forms():
    for completion in (HAPPY, conv(HAPPY)):
        assert score(completion, ["AU6", "AU12"], ["happiness"])["total"] == 3.0


def test_au_reward_paper_and_reference():
    half = "<think>Smile (AU12).</think><answer>happiness</answer>"
    none = "<think>A smile.</think><answer>happiness</answer>"
    truth = [["AU6", "AU12"]] * 2
    assert au_reward([half, none], AUs=truth) == pytest.approx([2 / 3, 0.0])
    assert au_reward_reference([half, none], AUs=truth) == pytest.approx([1 / 3, -1.0])
    # no AU annotation: constant 0.0 in both variants, whatever the completion says
    assert au_reward([half], AUs=[[]]) == [0.0]
    assert au_reward_reference([none], AUs=[None]) == [0.0]


def test_accuracy_reward_rules():
    multi = "<think>t</think><answer>anger or fear</answer>"
    double = "<think>t</think><answer>anger, anger</answer>"
    synonym = "<think>t</think><answer>Angry</answer>"
    assert accuracy_reward([multi, double, synonym], labels=[["anger"]] * 3) == [0.0, 0.0, 1.0]
    assert accuracy_reward([synonym], labels=[[]]) == [0.0]
    assert accuracy_reward_reference([synonym], labels=[[]]) == [0.5]
    # a multi-labelled record needs exactly that label set
    assert accuracy_reward([multi], labels=[["fear", "anger"]]) == [1.0]


def test_format_reward_and_columns_checked():
    assert format_reward([HAPPY, "happiness"]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        au_reward([HAPPY, HAPPY], AUs=[["AU6"]])
    with pytest.raises(ValueError):
        reward_functions("other")


def test_rewards_accept_extra_trl_columns():
    assert au_reward([HAPPY], AUs=[["AU6", "AU12"]], prompts=["p"], image=[None]) == [1.0]


def test_filter_accepts_only_exact_outputs():
    assert check(HAPPY, ["AU6", "AU12"], ["happiness"]).accepted
    r = check(HAPPY.replace("(AU6)", "(AU9)"), ["AU6", "AU12"], ["happiness"])
    assert r.codes == ["missing_aus", "extra_aus"]
    assert "AU6" in r.reasons[0] and "AU9" in r.reasons[1]


def test_filter_skips_unannotated_parts():
    assert check(HAPPY, [], ["happiness"]).accepted  # AU-free dataset
    assert check(HAPPY, ["AU6", "AU12"], []).accepted  # label-free dataset


def test_negated_au_cannot_satisfy_filter():
    negated = (
        "<think>Lip corners pulled (AU12), cheeks (AU6) absent.</think><answer>happiness</answer>"
    )
    r = check(negated, ["AU6", "AU12"], ["happiness"])
    assert not r.accepted and r.codes == ["missing_aus"]


def test_negative_wording_rejected_even_when_labels_match():
    text = (
        "<think>Cheeks raised (AU6), lip corners pulled (AU12), not sad.</think>"
        "<answer>happiness</answer>"
    )
    r = check(text, ["AU6", "AU12"], ["happiness"])
    assert r.codes == ["negative_wording"]


def test_all_reasons_reported_together():
    r = check("maybe AU4", ["AU6"], ["fear"])
    assert r.codes == ["bad_format", "missing_aus", "wrong_emotion"]
    assert set(r.codes) <= set(REASON_CODES)


sets = st.sets(st.sampled_from([f"AU{i}" for i in (1, 2, 4, 5, 6, 7, 9, 12, 15, 26)]))


@given(sets, sets)
def test_f1_in_range_and_symmetric(a, b):
    value = f1_score(a, b)
    assert 0.0 <= value <= 1.0
    assert value == f1_score(b, a)
    assert (value == 1.0) == (a == b)


@given(sets.filter(bool), sets.filter(bool))
def test_reference_au_reward_is_affine_in_paper_reward(truth, named):
    text = (
        "<think>" + ", ".join(f"x ({a})" for a in sorted(named)) + "</think><answer>fear</answer>"
    )
    paper = au_reward([text], AUs=[sorted(truth)])[0]
    reference = au_reward_reference([text], AUs=[sorted(truth)])[0]
    assert reference == pytest.approx(2 * paper - 1)


completion_parts = st.lists(
    st.sampled_from(
        [
            "<think>",
            "</think>",
            "<answer>",
            "</answer>",
            "AU4",
            "(AU12)",
            " not ",
            "anger",
            "happy",
            " or ",
            ", ",
            "x",
        ]
    ),
    max_size=12,
).map("".join)


@given(
    completion_parts,
    st.sampled_from([[], ["AU4"], ["AU4", "AU12"]]),
    st.sampled_from([[], ["anger"], ["happiness"]]),
    st.sampled_from(["paper", "reference"]),
)
def test_score_agrees_with_the_trl_reward_functions(text, aus, labels, variant):
    au_fn, acc_fn, fmt_fn = reward_functions(variant)
    expected = [au_fn([text], AUs=[aus])[0], acc_fn([text], labels=[labels])[0], fmt_fn([text])[0]]
    got = score(text, aus, labels, variant)
    assert [got["au"], got["accuracy"], got["format"]] == pytest.approx(expected)
    assert got["total"] == pytest.approx(sum(expected))
