"""Prediction frames and the numbers of one generation, on hand-computed predictions."""
import math

import pytest

from zoolib import evaluate, metrics

CLASSES = ["a", "b", "c"]


@pytest.fixture
def tiny():
    """Five known images and one of a class the model lacks; values worked out by hand."""
    probs = [[0.75, 0.15, 0.10],   # a -> a  right, confidence .75
             [0.25, 0.65, 0.10],   # a -> b  wrong, .65
             [0.05, 0.85, 0.10],   # b -> b  right, .85
             [0.20, 0.25, 0.55],   # b -> c  wrong, .55
             [0.05, 0.10, 0.85],   # c -> c  right, .85
             [0.40, 0.35, 0.25]]   # x: not in the class list
    return evaluate.frame_from_probs(
        ["a", "a", "b", "b", "c", "x"], probs, CLASSES, path=[f"p{i}" for i in range(6)],
        source=["real", "staged", "real", "synthetic", "staged", "real"])


def test_frame_columns(tiny):
    assert list(tiny["pred"]) == ["a", "b", "b", "c", "c", "a"]
    assert list(tiny["correct"]) == [True, False, True, False, True, False]
    assert tiny["loss"].iloc[0] == pytest.approx(-math.log(0.75))
    assert tiny["loss"].iloc[3] == pytest.approx(-math.log(0.25))
    assert math.isnan(tiny["loss"].iloc[5])


def test_metrics_by_hand(tiny):
    m = metrics.summarize(tiny, CLASSES)
    assert m["images"] == 5 and m["not_in_classes"] == 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 2 / 3) / 3)
    # AUC: a separates perfectly, b ranks 5 of 6 pairs right, c perfectly.
    assert m["roc_auc_ovr"] == pytest.approx((1 + 5 / 6 + 1) / 3)
    assert m["per_class"]["b"]["roc_auc"] == pytest.approx(round(5 / 6, 4))
    # ECE: bins .7-.8 (1 right), .6-.7 (1 wrong), .8-.9 (2 right), .5-.6 (1 wrong).
    assert m["ece"] == pytest.approx((0.25 + 0.65 + 2 * 0.15 + 0.55) / 5)
    assert m["by_source"] == {"real": 1.0, "staged": 0.5, "synthetic": 0.0}


def test_per_class_table(tiny):
    t = metrics.per_class(tiny, CLASSES).set_index("class")
    assert t.loc["a", "precision"] == 1.0 and t.loc["a", "recall"] == 0.5
    assert t.loc["c", "f1"] == pytest.approx(2 / 3)
    assert list(t["support"]) == [2, 2, 1]


def test_calibration_table(tiny):
    t = metrics.calibration(tiny[tiny["label"].isin(CLASSES)], n_bins=10)
    assert len(t) == 10 and t["count"].sum() == 5
    assert t.loc[8, "count"] == 2 and t.loc[8, "accuracy"] == 1.0
    assert t.loc[6, "accuracy"] == 0.0 and math.isnan(t.loc[0, "accuracy"])


def test_confusion_and_top_confusions(tiny):
    cm = metrics.confusion(tiny, CLASSES)
    assert cm.loc["a"].tolist() == [0.5, 0.5, 0.0]
    assert cm.loc["b"].tolist() == [0.0, 0.5, 0.5]
    assert cm.loc["c"].tolist() == [0.0, 0.0, 1.0]
    assert metrics.confusion(tiny, CLASSES, normalize=False).to_numpy().sum() == 5
    top = metrics.top_confusions(tiny, CLASSES)
    assert top[["true", "predicted", "count"]].values.tolist() == [["a", "b", 1], ["b", "c", 1]]
    assert top["share"].tolist() == [0.5, 0.5]
    pairs = metrics.confused_pairs(tiny, CLASSES)
    assert pairs[["a", "b", "count"]].values.tolist() == [["a", "b", 1], ["b", "c", 1]]
