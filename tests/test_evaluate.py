"""Figures, evaluating a trained generation, lineage."""
import json
import shutil

import numpy as np
import pytest

from zoolib import evaluate, library, metrics, models, splits


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
    top = metrics.top_confusions(frame, classes, n=3)
    assert top[["true", "predicted", "count"]].values.tolist() == [
        ["c00", "c07", 5], ["c00", "c01", 1], ["c01", "c02", 1]]
    assert top["share"].tolist() == pytest.approx([5 / 8, 1 / 8, 1 / 3])
    cm = metrics.confusion(frame, classes)
    assert cm.shape == (60, 60) and cm.loc["c00", "c07"] == pytest.approx(5 / 8)
    fig = evaluate.plot_confusion(cm, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 10_000
    # sorted by recall, worst first: c00 (3/8 right) is the first row
    assert fig.axes[0].get_yticklabels()[0].get_text() == "c00"


# ---- on a trained workspace -------------------------------------------------------------

def test_evaluate_generation(trained_ws, tmp_path):
    manifest = library.scan(trained_ws, progress=False)
    splits.freeze_benchmark(trained_ws, manifest, ["okapi"])  # as a later generation would
    ev = evaluate.evaluate(trained_ws, "last", report_dir=tmp_path / "rep", top_losses=4)
    assert len(ev.test) == len(splits.split_rows(trained_ws, manifest, ev.classes))
    assert set(ev.benchmark["path"]) == set(splits.benchmark_rows(trained_ws, manifest)["path"])
    known = ev.test[ev.test["label"].isin(ev.classes)]
    assert ev.metrics["test"]["accuracy"] == pytest.approx(known["correct"].mean())
    assert set(ev.metrics["test"]["by_source"]) <= {"real", "staged", "synthetic"}
    # okapi benchmark images (a class gen-0001 lacks) are not scored
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


def test_a_generation_is_tested_on_its_own_split_minus_what_its_lineage_trained_on(trained_ws):
    ws = trained_ws
    shutil.copytree(ws.models / "gen-0001", ws.models / "gen-0002")
    info_path = ws.models / "gen-0002" / "model.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()),
                                     "name": "gen-0002", "parent": "gen-0001"}))
    saved = models.read_splits(ws, "gen-0001")
    parent_train = saved[saved["split"] == "train"]
    leaked = set(parent_train["hash"].iloc[:5])  # say a rewrite moved these to test
    mine = saved.assign(split=np.where(saved["hash"].isin(leaked), "test", saved["split"]))
    mine.to_parquet(ws.models / "gen-0002" / "splits.parquet")
    ev = evaluate.evaluate(ws, "gen-0002", save=False)
    own_test = set(mine.loc[mine["split"] == "test", "hash"])
    hash_of = library.scan(ws, progress=False).set_index("path")["hash"]
    assert set(ev.test["path"].map(hash_of)) == own_test - leaked
    assert ev.metrics["test"]["left_out_trained"] == int(
        mine[mine["split"] == "test"]["hash"].isin(leaked).sum()) >= 5


def test_lineage_plot(trained_ws, tmp_path):
    table = evaluate.lineage(trained_ws)
    assert len(table) == 1 and not table.loc[0, "deployed"] and table.loc[0, "init"] == "scratch"
    evaluate.plot_lineage(table, tmp_path / "lineage.png")
    assert (tmp_path / "lineage.png").stat().st_size > 1000
