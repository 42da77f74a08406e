""" "AUs coded, none active": one definition (schema.aus_annotated) in rewards, filter, metrics."""

import pytest
from facial_r1_core.filter import check
from facial_r1_core.metrics import au_metrics
from facial_r1_core.rewards import au_reward, au_reward_reference, f1_score, reward_functions, score
from facial_r1_core.schema import Record, aus_annotated
from facial_r1_core.score import score_row
from facial_r1_core.vocab import BP4D_AUS, DISFA_AUS
from hypothesis import given
from hypothesis import strategies as st

CALM = "<think>A calm face with relaxed brows.</think><answer>neutral</answer>"
FROWN = "<think>Brows lowered (AU4).</think><answer>anger</answer>"


def rec(aus=(), meta=None):
    return Record.create(
        dataset="D", image="a.png", question="q", AUs=aus, labels=["neutral"], meta_info=meta
    )


@pytest.mark.parametrize(
    ("aus", "meta", "expected"),
    [
        ([], None, False),
        ([], {}, False),
        (["AU4"], None, True),
        ([], {"aus_annotated": "all"}, True),
        ([], {"aus_annotated": ["AU1", "AU2"]}, True),
        ([], {"aus_annotated": []}, False),
        ([], {"aus_annotated": "some"}, False),
        ([], {"aus_annotated": True}, False),
    ],
)
def test_aus_annotated_definition(aus, meta, expected):
    assert aus_annotated(rec(aus, meta)) is expected
    assert aus_annotated(rec(aus, meta).to_dict()) is expected
    assert aus_annotated({"AUs": aus, "meta_info": meta}) is expected


def test_aus_annotated_ignores_a_malformed_meta_info():
    assert aus_annotated({"AUs": [], "meta_info": "all"}) is False
    assert aus_annotated({}) is False


def test_paper_au_reward_on_au_free_frames():
    # coded, none active: naming none is right (F1(empty, empty) = 1), naming any is wrong
    assert au_reward([CALM, FROWN], AUs=[[], []], aus_annotated=[True, True]) == [1.0, 0.0]
    # no AU annotation: a constant 0, whatever the completion says
    assert au_reward([CALM, FROWN], AUs=[[], []], aus_annotated=[False, False]) == [0.0, 0.0]
    assert au_reward([CALM, FROWN], AUs=[[], []]) == [0.0, 0.0]  # column absent
    # active AUs: unchanged
    assert au_reward([CALM, FROWN], AUs=[["AU4"]] * 2, aus_annotated=[True] * 2) == [0.0, 1.0]


def test_reference_au_reward_keeps_the_authors_rule():
    # the authors' code treats an empty AU list as "not annotated" whatever the flag says
    assert au_reward_reference([CALM, FROWN], AUs=[[], []], aus_annotated=[True, True]) == [0, 0]


def test_score_and_filter_use_the_flag():
    assert score(CALM, [], ["neutral"], aus_annotated=True)["au"] == 1.0
    assert score(FROWN, [], ["neutral"], aus_annotated=True)["au"] == 0.0
    assert score(CALM, [], ["neutral"])["au"] == 0.0
    assert check(CALM, [], ["neutral"], aus_annotated=True).accepted
    r = check(
        CALM.replace("relaxed brows", "brows lowered (AU4)"), [], ["neutral"], aus_annotated=True
    )
    assert r.codes == ["extra_aus"] and "AU4" in r.reasons[0]
    assert check(FROWN, [], ["anger"]).accepted  # unannotated: AUs not checked


def test_score_command_reads_meta_info():
    row = {
        "completion": FROWN,
        "AUs": [],
        "labels": ["anger"],
        "meta_info": {"aus_annotated": "all"},
    }
    out = score_row(row)
    assert out["rewards"]["au"] == 0.0 and out["filter"]["codes"] == ["extra_aus"]
    calm = score_row({**row, "completion": CALM, "labels": ["neutral"]})
    assert calm["rewards"]["au"] == 1.0 and calm["filter"]["accepted"]


AUS = ["AU1", "AU2", "AU4", "AU6", "AU12"]
named = st.sets(st.sampled_from(AUS))


def _text(aus):
    return (
        "<think>"
        + ", ".join(f"x ({a})" for a in sorted(aus))
        + " face.</think><answer>fear</answer>"
    )


@given(named, named, st.booleans(), st.sampled_from(["paper", "reference"]))
def test_score_agrees_with_trl_rewards_with_the_flag(truth, pred, flag, variant):
    text = _text(pred)
    au_fn = reward_functions(variant)[0]
    expected = au_fn([text], AUs=[sorted(truth)], aus_annotated=[flag])[0]
    assert score(text, sorted(truth), ["fear"], variant, aus_annotated=flag)["au"] == expected
    if variant == "paper":
        annotated = bool(truth) or flag
        assert expected == (f1_score(pred, truth) if annotated else 0.0)
        if annotated and not truth:
            assert expected == (1.0 if not pred else 0.0)


def test_au_free_frames_count_false_positives():
    truths = [{"AU4"}, set(), set()]
    silent = au_metrics(truths, [{"AU4"}, set(), set()])
    noisy = au_metrics(truths, [{"AU4"}, {"AU4"}, {"AU12"}], subset=["AU4", "AU12"])
    assert silent["micro_f1"] == 1.0
    assert noisy["per_au"]["AU4"] == pytest.approx(
        {"f1": 2 / 3, "precision": 0.5, "recall": 1.0, "support": 1}
    )
    assert noisy["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 0))


def test_protocol_average_f1():
    m = au_metrics([{"AU1", "AU2"}], [{"AU1"}], subset="bp4d")
    assert m["aus"] == list(BP4D_AUS)
    assert m["average_f1"] == pytest.approx(1.0 / 12)  # AU1 = 1, the other eleven 0
    assert m["macro_f1"] == pytest.approx(0.5)  # over AUs with support only: AU1, AU2
    d = au_metrics([set(DISFA_AUS)], [set(DISFA_AUS)], subset="disfa")
    assert d["average_f1"] == 1.0


pairs = st.lists(st.tuples(named, named), min_size=1, max_size=10)


@given(pairs, named)
def test_an_au_free_frame_never_raises_micro_f1(samples, pred):
    truths = [t for t, _ in samples]
    preds = [p for _, p in samples]
    before = au_metrics(truths, preds, subset=AUS)["micro_f1"]
    after = au_metrics([*truths, set()], [*preds, pred], subset=AUS)["micro_f1"]
    assert after <= before + 1e-12
    if not pred:
        assert after == pytest.approx(before)
