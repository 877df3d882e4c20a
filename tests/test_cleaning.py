"""Cleaning with the model: out-of-fold predictions, label issues, overlapping classes,
out-of-distribution library images, the embedding map, and the widget's label fixes."""
import subprocess
import sys

import numpy as np
import pandas as pd
from PIL import Image

from zoolib import cleaning, curate, journal, library, models
from zoolib.train import TrainConfig
from zoolib.widgets import CurationWidget

from .conftest import TINY

CLASSES = ["antelope", "gazelle", "zebra"]


def planted_table(n: int = 90, seed: int = 0):
    """A fixed probability matrix: confident, correct predictions except 5 planted
    label errors whose model strongly prefers another class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    probs = rng.dirichlet([1, 1, 1], n) * 0.2
    probs[np.arange(n), labels] += 0.8
    planted = [3, 17, 40, 58, 77]
    for i in planted:
        wrong = (labels[i] + 1) % 3
        probs[i] = 0.02
        probs[i, wrong] = 0.96
    table = pd.DataFrame({"path": [f"{CLASSES[l]}/img_{i:03d}.jpg" for i, l in
                                   enumerate(labels)], "label": [CLASSES[l] for l in labels],
                          "probs": list(probs / probs.sum(axis=1, keepdims=True)),
                          "split": "pool"})
    table.attrs["classes"] = CLASSES
    return table, [table["path"][i] for i in planted], [CLASSES[(labels[i] + 1) % 3]
                                                         for i in planted]


def test_planted_label_errors_rank_first(demo_ws):
    table, planted, truth = planted_table()
    issues = cleaning.label_issues(demo_ws, table)
    assert set(issues["path"].head(5)) == set(planted)
    assert len(issues) <= 8  # a few borderline ones at most, not the confident rows
    by_path = issues.set_index("path")
    assert [by_path.loc[p, "suggested"] for p in planted] == truth
    assert issues["label_quality"].is_monotonic_increasing


def test_overlapping_classes_found_on_a_constructed_confusion():
    rng = np.random.default_rng(1)
    n = 300
    labels = np.arange(n) % 3
    probs = np.full((n, 3), 0.05)
    probs[np.arange(n), labels] = 0.9
    # antelope and gazelle are mixed up: half of each look like the other
    mixed = np.flatnonzero(labels < 2)[rng.random(200) < 0.35]
    probs[mixed] = probs[mixed][:, [1, 0, 2]]
    table = pd.DataFrame({"label": [CLASSES[l] for l in labels], "probs": list(probs)})
    pairs = cleaning.overlapping_classes(table, CLASSES)
    assert {pairs.loc[0, "class_a"], pairs.loc[0, "class_b"]} == {"antelope", "gazelle"}
    assert pairs.loc[0, "overlapping"] > 20
    fig = cleaning.plot_overlaps(pairs)
    bars = fig.axes[0].patches  # one bar per pair, the worst on top
    assert len(bars) == len(pairs)
    assert bars[-1].get_width() == pairs.loc[0, "overlapping"]
    assert fig.axes[0].get_yticklabels()[-1].get_text() == \
        f"{pairs.loc[0, 'class_a']} / {pairs.loc[0, 'class_b']}"


def _issue_row(ws, path: str, suggested: str) -> pd.DataFrame:
    label = path.split("/")[0]
    return pd.DataFrame([{"path": path, "label": label, "suggested": suggested,
                          "label_quality": 0.01, "given_prob": 0.01, "suggested_prob": 0.9,
                          "split": "pool"}])


def test_relabel_through_the_widget_moves_journals_and_undoes_exactly(demo_ws):
    path = sorted(p.relative_to(demo_ws.library).as_posix()
                  for p in (demo_ws.library / "lion").iterdir())[0]
    data = (demo_ws.library / path).read_bytes()
    curate.set_source(demo_ws, [path], "staged")
    widget = CurationWidget(demo_ws, {"label issues": _issue_row(demo_ws, path, "leopard")})
    assert widget.selected == [path] and widget.relabel_to.value == "leopard"
    next(b for b in widget.buttons if b.description == "relabel").click()
    moved = demo_ws.library / "leopard" / path.split("/")[1]
    assert moved.read_bytes() == data and not (demo_ws.library / path).exists()
    meta = library.read_meta(demo_ws).set_index("path")
    assert meta.loc[f"leopard/{moved.name}", "source"] == "staged" and path not in meta.index
    assert journal.read(demo_ws, "relabel").shape[0] == 1
    next(b for b in widget.buttons if b.description == "undo last").click()
    assert (demo_ws.library / path).read_bytes() == data and not moved.exists()
    assert library.read_meta(demo_ws).set_index("path").loc[path, "source"] == "staged"


def test_checked_marks_persist_across_kernels_and_leave_the_list(demo_ws):
    table, planted, _ = planted_table()
    real = sorted(p.relative_to(demo_ws.library).as_posix()
                  for p in (demo_ws.library / "zebra").iterdir())[:1]
    table.loc[table["path"] == planted[0], "path"] = real[0]  # a planted error on a real file
    widget = CurationWidget(demo_ws, {"label issues": cleaning.label_issues(demo_ws, table)})
    widget.index.value = list(widget.lists["label issues"]["path"]).index(real[0])
    next(b for b in widget.buttons if b.description == "checked").click()
    code = ("import sys; from zoolib import curate; from zoolib.workspace import open_workspace;"
            "print(sorted(curate.checked_paths(open_workspace(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, str(demo_ws.root)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == str(real)  # a fresh interpreter reads the mark back
    assert real[0] not in set(cleaning.label_issues(demo_ws, table)["path"])
    assert real[0] in set(cleaning.label_issues(demo_ws, table, include_checked=True)["path"])


def test_out_of_fold_predicts_each_image_with_a_model_that_held_it_out(trained_ws):
    cfg = TrainConfig(**{**TINY, "epochs": 1, "init_from": "last", "freeze_epochs": 0})
    oof = cleaning.out_of_fold(trained_ws, cfg, folds=2, progress=False)
    assert oof["path"].is_unique and set(oof["fold"]) == {-1, 0, 1}
    classes = oof.attrs["classes"]  # every row predicted, the held-out ones too
    assert list(oof["pred"]) == [classes[i] for i in np.stack(oof["probs"]).argmax(axis=1)]
    assert np.allclose(oof["confidence"], np.stack(oof["probs"]).max(axis=1))
    for name in oof.attrs["generations"]:
        assert models.read_info(trained_ws, name)["throwaway"]
        trained = models.read_splits(trained_ws, name)
        trained = set(trained.loc[trained["split"] == "train", "hash"])
        assert not trained & set(oof.loc[oof["generation"] == name, "hash"])
    # each pool image's probabilities are its fold model's own; test and benchmark
    # images (held out by every fold) get the mean of the fold models
    from zoolib.evaluate import predict_rows

    names = oof.attrs["generations"]
    for name in names:
        rows = oof[oof["generation"] == name].head(5)
        direct = predict_rows(trained_ws, name, rows)
        np.testing.assert_allclose(np.stack(rows["probs"]), np.stack(direct["probs"]), atol=1e-5)
    held = oof[oof["fold"] == -1].head(5)
    each = [np.stack(predict_rows(trained_ws, n, held)["probs"]) for n in names]
    np.testing.assert_allclose(np.stack(held["probs"]), np.mean(each, axis=0), atol=1e-5)
    again = cleaning.load_oof(trained_ws)
    assert again.attrs["classes"] == oof.attrs["classes"] and len(again) == len(oof)
    np.testing.assert_allclose(np.stack(again["probs"]), np.stack(oof["probs"]), atol=1e-6)
    assert models.resolve_generation(trained_ws, "last") == "gen-0001"  # folds never "last"


def test_ood_and_map_on_a_trained_generation(trained_ws):
    odd = trained_ws.library / "lion" / "zz_blank.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(odd)
    ood = cleaning.out_of_distribution(trained_ws, "gen-0001", progress=False)
    lions = ood[ood["label"] == "lion"]
    assert lions["path"].iloc[0] == "lion/zz_blank.png"  # least like its class
    frame = cleaning.map_frame(trained_ws, "gen-0001", marks={"ood": {"lion/zz_blank.png"}},
                               progress=False)
    assert frame[["x", "y"]].notna().all().all() and (frame["mark"] == "ood").sum() == 1
    inside = cleaning.region(frame, (-np.inf, np.inf), (-np.inf, np.inf))
    assert len(inside) == len(frame)
    fig = cleaning.plot_map(frame)
    ax = fig.axes[0]
    # every image is a point: library and inbox of each class, plus the marked rings
    drawn = sum(len(c.get_offsets()) for c in ax.collections)
    assert drawn == len(frame) + int((frame["mark"] != "").sum())
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert set(frame["label"]) <= labels


def test_map_region_opens_the_images_inside_the_rectangle(demo_ws):
    from zoolib.widgets import MapRegion

    lions = sorted(p.relative_to(demo_ws.library).as_posix()
                   for p in (demo_ws.library / "lion").iterdir())[:4]
    points = pd.DataFrame({"path": lions, "where": "library", "label": "lion",
                           "x": [0.0, 1.0, 5.0, 9.0], "y": [0.0, 1.0, 5.0, 9.0],
                           "mark": ["", "ood", "", ""]})
    view = MapRegion(demo_ws, points)
    view.x.value, view.y.value = (-0.5, 1.5), (-0.5, 1.5)
    assert view.paths == [str(demo_ws.library / p) for p in lions[:2]]
    assert [t.path for t in view.grid.tiles if t.path] == view.paths
    assert view.grid.tiles[1].toggle.button_style == "warning"  # the marked image


def test_the_default_flags_cleanlabs_estimated_count_lowest_quality_first(demo_ws):
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    rng = np.random.default_rng(1)
    n, k = 600, 4
    labels = rng.integers(0, k, n)
    # a model that is often unsure between the given class and another: its confusions
    # look like label noise to cleanlab's own default filter
    probs = rng.dirichlet(np.ones(k) * 0.7, n)
    probs[np.arange(n), labels] += rng.uniform(0.2, 1.2, n)
    probs /= probs.sum(axis=1, keepdims=True)
    classes = [f"c{i}" for i in range(k)]
    table = pd.DataFrame({"path": [f"c{l}/img_{i:03d}.jpg" for i, l in enumerate(labels)],
                          "label": [classes[l] for l in labels], "probs": list(probs),
                          "split": "pool"})
    table.attrs["classes"] = classes
    issues = cleaning.label_issues(demo_ws, table)
    quality = pd.Series(get_label_quality_scores(labels, probs), index=table["path"])
    count = num_label_issues(labels, probs)
    assert len(issues) == count > 0
    flagged = quality.index.isin(issues["path"])
    assert quality[flagged].max() <= quality[~flagged].min()  # the lowest ones, nothing skipped
    assert count < find_label_issues(labels, probs).sum()  # fewer than cleanlab's default


def test_a_combined_table_flags_only_what_each_source_doubts_too(demo_ws):
    table, planted, _ = planted_table()
    probs = np.stack(table["probs"])
    doubted = [5, 20]  # labels one source is sure are wrong, the other less so
    one, other = probs.copy(), probs.copy()
    for i in doubted:
        wrong = (i % 3 + 1) % 3  # label i % 3
        one[i], other[i] = 0.02, 0.05
        one[i, wrong], other[i, wrong], other[i, i % 3] = 0.96, 0.75, 0.2
    table = table.assign(probs_a=list(one), probs_b=list(other),
                         probs=list((one + other) / 2))
    mean_only = set(cleaning.label_issues(demo_ws, table, consensus=False)["path"])
    both = set(cleaning.label_issues(demo_ws, table)["path"])
    doubted_paths = {table["path"][i] for i in doubted}
    assert doubted_paths <= mean_only  # the mean alone flags them
    assert not doubted_paths & both and set(planted) <= both  # the consensus does not
    assert both < mean_only
