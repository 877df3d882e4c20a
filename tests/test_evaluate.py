"""Evaluation metrics on hand-computed predictions, comparison, promotion, lineage."""
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from zoolib import evaluate, journal, library, models
from zoolib.workspace import ZoolibError

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
    m = evaluate.summarize(tiny, CLASSES)
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
    t = evaluate.per_class(tiny, CLASSES).set_index("class")
    assert t.loc["a", "precision"] == 1.0 and t.loc["a", "recall"] == 0.5
    assert t.loc["c", "f1"] == pytest.approx(2 / 3)
    assert list(t["support"]) == [2, 2, 1]


def test_calibration_table(tiny):
    t = evaluate.calibration(tiny[tiny["label"].isin(CLASSES)], n_bins=10)
    assert len(t) == 10 and t["count"].sum() == 5
    assert t.loc[8, "count"] == 2 and t.loc[8, "accuracy"] == 1.0
    assert t.loc[6, "accuracy"] == 0.0 and math.isnan(t.loc[0, "accuracy"])


def test_confusion_and_top_confusions(tiny):
    cm = evaluate.confusion(tiny, CLASSES)
    assert cm.loc["a"].tolist() == [0.5, 0.5, 0.0]
    assert cm.loc["b"].tolist() == [0.0, 0.5, 0.5]
    assert cm.loc["c"].tolist() == [0.0, 0.0, 1.0]
    assert evaluate.confusion(tiny, CLASSES, normalize=False).to_numpy().sum() == 5
    top = evaluate.top_confusions(tiny, CLASSES)
    assert top[["true", "predicted", "count"]].values.tolist() == [["a", "b", 1], ["b", "c", 1]]
    assert top["share"].tolist() == [0.5, 0.5]
    pairs = evaluate.confused_pairs(tiny, CLASSES)
    assert pairs[["a", "b", "count"]].values.tolist() == [["a", "b", 1], ["b", "c", 1]]


def _sixty():
    """60 classes, 3 images each (2 right, 1 taken for the next class); c00 has 5 more
    images all predicted as c07."""
    classes = [f"c{i:02d}" for i in range(60)]
    labels, preds = [], []
    for i, c in enumerate(classes):
        labels += [c] * 3
        preds += [c, c, classes[(i + 1) % 60]]
    labels += ["c00"] * 5
    preds += ["c07"] * 5
    probs = np.full((len(labels), 60), 0.1 / 59)
    for r, p in enumerate(preds):
        probs[r, classes.index(p)] = 0.9
    return evaluate.frame_from_probs(labels, probs, classes), classes


def test_confusion_readable_with_60_classes(tmp_path):
    frame, classes = _sixty()
    top = evaluate.top_confusions(frame, classes, n=3)
    assert top[["true", "predicted", "count"]].values.tolist() == [
        ["c00", "c07", 5], ["c00", "c01", 1], ["c01", "c02", 1]]
    assert top["share"].tolist() == pytest.approx([5 / 8, 1 / 8, 1 / 3])
    cm = evaluate.confusion(frame, classes)
    assert cm.shape == (60, 60) and cm.loc["c00", "c07"] == pytest.approx(5 / 8)
    fig = evaluate.plot_confusion(cm, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 10_000
    # sorted by recall, worst first: c00 (3/8 right) is the first row
    assert fig.axes[0].get_yticklabels()[0].get_text() == "c00"


def _pred(paths, labels, preds, classes):
    probs = np.full((len(paths), len(classes)), 0.05)
    for r, p in enumerate(preds):
        probs[r, classes.index(p)] = 0.9
    return evaluate.frame_from_probs(labels, probs, classes, path=paths)


@pytest.fixture
def comp():
    """Baseline knows a, b; the candidate adds c. On a and b both get 3 of 4 right,
    but a gains 0.5 and b drops 0.5."""
    paths = [f"p{i}" for i in range(7)]
    labels = ["a", "a", "b", "b", "c", "c", "x"]
    base = _pred(paths, labels, ["a", "b", "b", "b", "a", "b", "a"], ["a", "b"])
    cand = _pred(paths, labels, ["a", "a", "b", "a", "c", "a", "c"], ["a", "b", "c"])
    return evaluate.compare_frames(cand, ["a", "b", "c"], "gen-0002", base, ["a", "b"], "gen-0001")


def test_compare_different_class_lists(comp):
    assert comp.shared == ["a", "b"] and comp.new == ["c"] and comp.removed == []
    assert comp.images == 4
    assert comp.baseline_accuracy == 0.75 and comp.candidate_accuracy == 0.75
    assert comp.gain == 0
    t = comp.per_class.set_index("class")
    assert t.loc["a", ["baseline", "candidate", "change"]].tolist() == [0.5, 1.0, 0.5]
    assert t.loc["b", ["baseline", "candidate", "change"]].tolist() == [1.0, 0.5, -0.5]
    assert comp.new_classes.values.tolist() == [["c", 2, 0.5]]
    side = comp.side_by_side()
    assert list(side.columns) == ["class", "images", "gen-0001", "gen-0002", "change"]
    assert side.iloc[-1]["images"] == 4
    json.dumps(comp.summary())  # JSON-ready


def test_compare_needs_same_images(comp):
    a = _pred(["p1"], ["a"], ["a"], ["a", "b"])
    b = _pred(["p2"], ["a"], ["a"], ["a", "b"])
    with pytest.raises(ZoolibError, match="same images"):
        evaluate.compare_frames(a, ["a", "b"], "x", b, ["a", "b"], "y")


@pytest.mark.parametrize("min_gain,ok", [(-0.01, True), (0.0, True), (0.01, False)])
def test_rule_min_gain_threshold(comp, min_gain, ok):
    d = evaluate.decide(comp, min_gain=min_gain, max_class_drop=1.0)
    assert d.promote is ok
    assert ("below MIN_GAIN" in str(d)) is (not ok)


@pytest.mark.parametrize("max_drop,ok", [(0.49, False), (0.5, True), (0.51, True)])
def test_rule_max_class_drop_threshold(comp, max_drop, ok):
    d = evaluate.decide(comp, min_gain=0.0, max_class_drop=max_drop)
    assert d.promote is ok
    assert ("b -0.500" in str(d)) is (not ok)
    assert "new classes (not in the rule): c" in str(d)


# ---- on a trained workspace -------------------------------------------------------------

def test_evaluate_generation(trained_ws, tmp_path):
    ev = evaluate.evaluate(trained_ws, "last", report_dir=tmp_path / "rep", top_losses=4)
    manifest = library.scan(trained_ws, progress=False)
    assert len(ev.test) == len(evaluate.split_rows(trained_ws, manifest, ev.classes))
    assert set(ev.benchmark["path"]) == set(evaluate.benchmark_rows(trained_ws, manifest)["path"])
    known = ev.test[ev.test["label"].isin(ev.classes)]
    assert ev.metrics["test"]["accuracy"] == pytest.approx(known["correct"].mean())
    assert set(ev.metrics["test"]["by_source"]) <= {"real", "staged", "synthetic"}
    # okapi (below the cutoff) and Unknown benchmark images are not scored
    assert ev.metrics["benchmark"]["not_in_classes"] == int(
        (~ev.benchmark["label"].isin(ev.classes)).sum()) > 0
    for name in ("confusion_test.png", "confusion_benchmark.png", "top_losses.png",
                 "calibration.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 1000
    info = models.read_info(trained_ws, "gen-0001")
    assert info["metrics"]["test_accuracy"] == ev.metrics["test"]["accuracy"]
    assert info["metrics"]["benchmark_accuracy"] == ev.metrics["benchmark"]["accuracy"]
    assert info["metrics"]["best_epoch"] >= 1  # training metrics are kept
    assert info["evaluation"]["test"]["images"] == len(known)


def test_first_promotion_then_rule(trained_ws):
    ws = trained_ws
    d = evaluate.promote(ws, "gen-0001")
    assert d.promote and d.promoted
    assert models.read_deployed(ws)["generation"] == "gen-0001"
    rows = journal.read(ws, "promote")
    assert len(rows) == 1 and json.loads(rows["details"][0])["generation"] == "gen-0001"
    assert not evaluate.promote(ws, "gen-0001").promoted  # already deployed
    # a candidate identical to the deployed one: gain 0, no class drops
    shutil.copytree(ws.models / "gen-0001", ws.models / "gen-0002")
    info_path = ws.models / "gen-0002" / "model.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()),
                                     "name": "gen-0002", "parent": "gen-0001"}))
    comp = evaluate.compare(ws, "gen-0002", "deployed")
    assert comp.gain == 0 and comp.new == [] and comp.images > 0
    d = evaluate.promote(ws, "gen-0002", comp, min_gain=0.01)
    assert not d.promote and not d.promoted
    assert models.read_deployed(ws)["generation"] == "gen-0001"
    d = evaluate.promote(ws, "gen-0002", comp, min_gain=0.01, force=True)
    assert d.promoted and models.read_deployed(ws)["forced"] is True
    assert models.read_deployed(ws)["previous"] == "gen-0001"
    assert len(journal.read(ws, "promote")) == 2
    table = evaluate.lineage(ws)
    assert table["generation"].tolist() == ["gen-0001", "gen-0002"]
    assert table["deployed"].tolist() == [False, True]
    assert table.loc[1, "parent"] == "gen-0001"
    assert table.loc[0, "classes_added"].split(", ") == models.read_info(ws, "gen-0001")["classes"]


def test_compare_with_a_new_class(trained_ws):
    ws = trained_ws
    evaluate.promote(ws, "gen-0001")
    old = models.read_info(ws, "gen-0001")
    classes = sorted(old["classes"] + ["okapi"])  # okapi has benchmark images
    model = models.create_model(old["arch"], len(classes))
    info = {k: old[k] for k in ("arch", "img_size", "mean", "std")}
    models.save_generation(ws, model, {**info, "classes": classes, "parent": "gen-0001"})
    comp = evaluate.compare(ws, "gen-0002")
    bench = evaluate.benchmark_rows(ws, library.scan(ws, progress=False))
    assert comp.new == ["okapi"] and comp.shared == old["classes"]
    assert comp.new_classes["images"].tolist() == [int((bench["label"] == "okapi").sum())]
    assert comp.images == int(bench["label"].isin(old["classes"]).sum())
    assert "okapi" not in comp.per_class["class"].tolist()


def test_throwaway_never_promoted(trained_ws):
    models.update_info(trained_ws, "gen-0001", throwaway=True)
    for force in (False, True):
        with pytest.raises(ZoolibError, match="gen-0001 is a throw-away generation"):
            evaluate.promote(trained_ws, "gen-0001", force=force)
    assert models.read_deployed(trained_ws) is None
    assert len(journal.read(trained_ws, "promote")) == 0
    d, _ = evaluate.judge(trained_ws, "gen-0001")
    assert not d.promote


def test_lineage_plot(trained_ws, tmp_path):
    table = evaluate.lineage(trained_ws)
    assert len(table) == 1 and not table.loc[0, "deployed"] and table.loc[0, "init"] == "scratch"
    evaluate.plot_lineage(table, tmp_path / "lineage.png")
    assert (tmp_path / "lineage.png").stat().st_size > 1000


def test_rule_min_class_images_leaves_small_classes_out():
    labels, paths = ["a"] * 4 + ["b"] * 20, [f"{i}.jpg" for i in range(24)]
    base = evaluate.frame_from_probs(labels, np.eye(2)[[0] * 4 + [1] * 20], ["a", "b"], path=paths)
    cand = evaluate.frame_from_probs(labels, np.eye(2)[[0, 0, 1, 1] + [1] * 20], ["a", "b"],
                                     path=paths)
    comp = evaluate.compare_frames(cand, ["a", "b"], "new", base, ["a", "b"], "old")
    assert not evaluate.decide(comp, min_gain=-1.0, max_class_drop=0.05).promote
    d = evaluate.decide(comp, min_gain=-1.0, max_class_drop=0.05, min_class_images=5)
    assert d.promote and any("left out of the drop check: a" in r for r in d.reasons)
    assert not evaluate.decide(comp, min_gain=-1.0, max_class_drop=0.05, min_class_images=4).promote
