"""Metrics: known values, and properties that must hold for any input."""

import pytest
from facial_r1_core.metrics import au_metrics, emotion_metrics, rege, rouge_l
from facial_r1_core.vocab import BP4D_AUS
from hypothesis import given
from hypothesis import strategies as st

AUS = [f"AU{i}" for i in (1, 2, 4, 6, 7, 12, 15, 25)]
au_sets = st.sets(st.sampled_from(AUS))
paired = st.integers(min_value=1, max_value=12).flatmap(
    lambda n: st.tuples(
        st.lists(au_sets, min_size=n, max_size=n), st.lists(au_sets, min_size=n, max_size=n)
    )
)
EMOS = ["anger", "fear", "happiness"]


def test_emotion_metrics_known_values():
    m = emotion_metrics(["anger", "anger", "fear", None], ["anger", "fear", "fear", "anger"], EMOS)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["per_class"] == {"anger": 0.5, "fear": 1.0, "happiness": 0.0}
    assert m["confusion"][0] == [1, 1, 0, 0]
    assert m["n"] == 3


def test_unparsed_prediction_lands_in_other():
    m = emotion_metrics(["anger"], [None], EMOS)
    assert m["confusion"][0][-1] == 1 and m["accuracy"] == 0.0


def test_truth_outside_classes_is_an_error():
    with pytest.raises(ValueError, match="surprise"):
        emotion_metrics(["surprise"], ["anger"], EMOS)


def test_au_metrics_known_values():
    m = au_metrics([{"AU1", "AU2"}, {"AU4"}], [{"AU1"}, {"AU4", "AU12"}])
    # AU1 tp1; AU2 fn1; AU4 tp1; AU12 is not in any truth, so not scored in the default subset
    assert m["aus"] == ["AU1", "AU2", "AU4"]
    assert m["per_au"]["AU2"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))


def test_au_subset_protocols():
    m = au_metrics([{"AU1", "AU9"}], [{"AU1"}], subset="bp4d")
    assert m["aus"] == list(BP4D_AUS)
    assert m["micro_f1"] == 1.0  # AU9 is not a BP4D AU
    assert m["macro_f1"] == 1.0  # only AU1 has support
    with pytest.raises(ValueError):
        au_metrics([{"AU1"}], [{"AU1"}], subset="nope")


@given(paired)
def test_au_f1_in_range(pair):
    truths, preds = pair
    m = au_metrics(truths, preds)
    assert 0.0 <= m["micro_f1"] <= 1.0 and 0.0 <= m["macro_f1"] <= 1.0
    for v in m["per_au"].values():
        assert 0.0 <= v["f1"] <= 1.0


@given(paired)
def test_perfect_predictions_score_one(pair):
    truths, _ = pair
    m = au_metrics(truths, truths)
    if any(truths):
        assert m["micro_f1"] == 1.0 and m["macro_f1"] == 1.0


@given(paired, st.randoms())
def test_au_f1_permutation_invariant(pair, rnd):
    truths, preds = pair
    order = list(range(len(truths)))
    rnd.shuffle(order)
    a = au_metrics(truths, preds)
    b = au_metrics([truths[i] for i in order], [preds[i] for i in order])
    assert a["micro_f1"] == pytest.approx(b["micro_f1"])
    assert a["macro_f1"] == pytest.approx(b["macro_f1"])


@given(paired)
def test_per_au_f1_symmetric_when_swapping_roles(pair):
    truths, preds = pair
    subset = AUS
    a = au_metrics(truths, preds, subset=subset)
    b = au_metrics(preds, truths, subset=subset)
    assert a["micro_f1"] == pytest.approx(b["micro_f1"])
    for au in subset:
        assert a["per_au"][au]["f1"] == pytest.approx(b["per_au"][au]["f1"])


@given(st.lists(st.sampled_from(EMOS), min_size=1, max_size=20), st.randoms())
def test_emotion_accuracy_range_and_permutation(labels, rnd):
    preds = labels[:]
    rnd.shuffle(preds)
    m = emotion_metrics(labels, preds, EMOS)
    assert 0.0 <= m["accuracy"] <= 1.0
    assert sum(map(sum, m["confusion"])) == len(labels)
    assert emotion_metrics(labels, labels, EMOS)["accuracy"] == 1.0


def test_rouge_l_and_rege():
    assert rouge_l(["a b c d"], ["a b c d"]) == 1.0
    assert rouge_l(["brows lowered"], ["a smiling face"]) == 0.0
    assert 0.0 < rouge_l(["the brows are lowered and pulled"], ["brows lowered"]) < 1.0
    assert rouge_l([], []) == 0.0
    assert rege(0.5, 0.25) == 75.0
