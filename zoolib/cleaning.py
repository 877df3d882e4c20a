"""Clean the library with the model: label issues, overlapping classes, out-of-distribution
images and an embedding map, from out-of-fold predictions (cleanlab does the estimating).

The estimators need predictions of each image by a model that did not train on
it: fold models or a linear probe on a pretrained embedder (`oof`, whose calls
are re-exported here). cleanlab then finds the label issues (`filter.find_label_issues`, ranked by
`rank.get_label_quality_scores`), the overlapping classes
(`dataset.find_overlapping_classes`) and the out-of-distribution images
(`outlier.OutOfDistribution`, per class on the generation's features). Writing
our own estimators would only repeat theirs.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import curate, inference, library, models, plots, probe
from .embedder import MODEL, display_name, library_vectors, vectors
from .oof import (OOF_FILE, PART_COLUMNS, combine_oof, folder, load_oof,  # noqa: F401 - re-exported
                  out_of_fold, predictions, probe_oof, save_oof)
from .workspace import Workspace, ZoolibError

ISSUE_COLUMNS = ["path", "label", "suggested", "label_quality", "given_prob", "suggested_prob",
                 "split", "predicted_by"]


def _labels_and_probs(table: pd.DataFrame, classes: list[str] | None = None,
                      column: str = "probs") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer labels and the probability matrix (`column`) of rows whose label is a class."""
    classes = classes or table.attrs["classes"]
    index = {c: i for i, c in enumerate(classes)}
    known = table[table["label"].isin(index)]
    if known.empty:
        raise ZoolibError("no row has a label among the classes: nothing to clean")
    labels = known["label"].map(index).to_numpy(dtype=int)
    probs = np.stack(known[column]).astype(np.float64)
    return labels, probs / probs.sum(axis=1, keepdims=True), classes


# --------------------------------------------------------------------------- label issues

# cleanlab's "prune_by_noise_rate" (its default) flags every image its noise estimate
# cannot rule out, and a model's own confusions look like noise to it: with out-of-fold
# accuracy near 0.8 it flagged about twice the planted errors. "low_self_confidence"
# flags the images of lowest label quality, as many as cleanlab's `num_label_issues`
# estimates. bench/label_issues.py (448 flips in 8,858 CIFAR animals; three sets of
# out-of-fold predictions, accuracy 0.77-0.78): precision / recall 0.556 / 0.667,
# 0.462 / 0.719 and 0.563 / 0.722, against 0.372 / 0.703, 0.313 / 0.742 and
# 0.376 / 0.737 for "prune_by_noise_rate".
FILTER_BY = "low_self_confidence"

# A combined table (fold models and a probe, `combine_oof`) flags an image only when
# the filter flags it on the mean and on each source alone: the consensus filter of
# Brodley & Friedl ("Identifying mislabeled training data", JAIR 1999), which trades a
# little recall for precision. Two models that err differently seldom both doubt a
# correct label; a wrong one, both do. bench/label_issues.py, seed 1 (Lite0 fold
# models and the probe, out-of-fold accuracy 0.79): precision / recall 0.535 / 0.713
# on the mean alone, 0.598 / 0.682 with the consensus.
CONSENSUS = True


def label_issues(ws: Workspace, table: pd.DataFrame, filter_by: str = FILTER_BY,
                 include_checked: bool = False, consensus: bool = CONSENSUS) -> pd.DataFrame:
    """Library images whose label is likely wrong, worst first (cleanlab).

    Args:
        ws: the workspace (to leave out images a person marked checked).
        table: out-of-fold predictions (`out_of_fold` / `load_oof`).
        filter_by: cleanlab's `find_label_issues` method (FILTER_BY: the lowest label
            quality, as many as cleanlab estimates are mislabelled).
        include_checked: also list images already marked checked.
        consensus: in a combined table (`combine_oof`), flag only images the filter
            also flags on each source's own probabilities (CONSENSUS).

    Returns:
        Columns ISSUE_COLUMNS: the given label, the suggested one (the most likely
        other class), cleanlab's label quality score (low: likely wrong), the two
        probabilities and what predicted them (the table's `predicted_by`: fold
        models, a probe on an embedder, or both); sorted by label quality.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels, probs, classes = _labels_and_probs(table)
    known = table[table["label"].isin(classes)].reset_index(drop=True)
    quality = get_label_quality_scores(labels, probs)
    flagged = find_label_issues(labels, probs, filter_by=filter_by)
    for column in [c for c in PART_COLUMNS if c in table] if consensus else []:
        flagged &= find_label_issues(labels, _labels_and_probs(table, classes, column)[1],
                                     filter_by=filter_by)
    other = probs.copy()
    other[np.arange(len(labels)), labels] = -1  # the suggestion is another class
    best = other.argmax(axis=1)
    issues = pd.DataFrame({
        "path": known["path"], "label": known["label"],
        "suggested": [classes[i] for i in best], "label_quality": quality.round(4),
        "given_prob": probs[np.arange(len(labels)), labels].round(4),
        "suggested_prob": probs[np.arange(len(labels)), best].round(4),
        "split": known["split"], "predicted_by": table.attrs.get("predicted_by", "")})[flagged]
    if not include_checked:
        issues = issues[~issues["path"].isin(curate.checked_paths(ws))]
    return issues.sort_values("label_quality", ignore_index=True)[ISSUE_COLUMNS]


# --------------------------------------------------------------------------- overlap

def overlapping_classes(frame: pd.DataFrame, classes: list[str] | None = None,
                        top: int = 10) -> pd.DataFrame:
    """Pairs of classes the model cannot tell apart (cleanlab), most overlapping first.

    Args:
        frame: predictions with label and probs columns: the out-of-fold table, or
            a generation's test predictions (evaluate's frames).
        classes: the class order of `probs` (default: `frame.attrs["classes"]`).
        top: pairs to keep.

    Returns:
        Columns class_a, class_b, overlapping (estimated images of one labelled
        as the other), joint_probability.
    """
    from cleanlab.dataset import find_overlapping_classes

    labels, probs, classes = _labels_and_probs(frame, classes)
    found = find_overlapping_classes(labels=labels, pred_probs=probs, class_names=classes)
    found = found.rename(columns={"Class Name A": "class_a", "Class Name B": "class_b",
                                  "Num Overlapping Examples": "overlapping",
                                  "Joint Probability": "joint_probability"})
    columns = ["class_a", "class_b", "overlapping", "joint_probability"]
    return found[columns].head(top).reset_index(drop=True)


def plot_overlaps(pairs: pd.DataFrame, path: str | Path | None = None, title: str = ""):
    """Horizontal bars of the overlapping pairs (estimated images mixed up)."""
    fig, ax = plt.subplots(figsize=(6, 0.35 * max(len(pairs), 1) + 1))
    names = [f"{a} / {b}" for a, b in zip(pairs["class_a"], pairs["class_b"])]
    ax.barh(names[::-1], pairs["overlapping"].to_numpy()[::-1], color="tab:orange")
    ax.set_xlabel("images estimated to be mislabelled between the two")
    ax.set_title(title or "overlapping classes (cleanlab)")
    return plots.save(fig, path)


# --------------------------------------------------------------------------- features

def _library_rows(ws: Workspace, generation: str | None, embedder: str = MODEL
                  ) -> tuple[str | None, pd.DataFrame]:
    """The generation's name and the library's readable images of its classes, one row
    per content (a copy would only repeat its twin's score). With a pretrained
    embedder and no generation: the classes over the cutoff (`probe.rows_to_clean`)."""
    if embedder != MODEL and not models.generation_names(ws):
        return None, probe.rows_to_clean(ws, None)[0]
    name = models.resolve_generation(ws, generation, include_throwaway=True)
    classes = models.read_info(ws, name)["classes"]
    manifest = library.scan(ws, progress=False)
    rows = manifest[manifest["readable"] & manifest["label"].isin(classes)]
    return name, rows.drop_duplicates("hash").reset_index(drop=True)


def library_features(ws: Workspace, generation: str | None, rows: pd.DataFrame,
                     batch_size: int = 128, progress: bool = True, embedder: str = MODEL
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Features of library images (path, hash columns) in one pass each: the
    generation's (`inference.library_outputs`) or a pretrained EMBEDDER's.

    Returns:
        (stage, embedding), float32 with one row per row of `rows`. With "model":
        the unit-length pooled features of the stage before the last
        (`heads.features`, which describe what is in the picture beyond the
        classes) and the pre-logit embedding (as bulk identification stores it).
        With a pretrained embedder its vectors, twice (`embedder.library_vectors`).
    """
    if embedder != MODEL:
        found = library_vectors(ws, embedder, rows, progress=progress)
        return found, found
    loaded = inference.load(ws, generation)
    if rows.empty:
        width = len(loaded.classes)
        return np.zeros((0, width), np.float32), np.zeros((0, width), np.float32)
    out = inference.library_outputs(ws, loaded, rows["path"], batch_size, stage=True, tta=False,
                                    keys=("stage", "embedding"), progress=progress,
                                    desc="library features")
    return out["stage"], out["embedding"]


def out_of_distribution(ws: Workspace, generation: str = "last", k: int = 10,
                        progress: bool = True, embedder: str = MODEL) -> pd.DataFrame:
    """Library images least like the rest of their class, most unusual first (cleanlab).

    cleanlab's `OutOfDistribution` scores each image by its mean distance to its
    k nearest neighbours in feature space; fitted per class here, so the score
    says how unlike its own class an image is (a feeder photo filed as
    flamingo, a blank frame). Features: see `library_features`.

    Returns:
        Columns path, label, ood_score (cleanlab's: low = unusual), rank_in_class,
        embedder (whose features: "model" or the backbone).
    """
    from cleanlab.outlier import OutOfDistribution

    name, rows = _library_rows(ws, generation, embedder)
    stage, _ = library_features(ws, name, rows, progress=progress, embedder=embedder)
    scores = np.full(len(rows), np.nan)
    for label, idx in rows.groupby("label").indices.items():
        if len(idx) > k + 1:  # cleanlab needs more images than neighbours
            ood = OutOfDistribution(params={"k": k})
            scores[idx] = ood.fit_score(features=stage[idx], verbose=False)
    out = rows[["path", "label"]].assign(ood_score=scores.round(5))
    out["rank_in_class"] = out.groupby("label")["ood_score"].rank(method="first").astype("Int64")
    out["embedder"] = display_name(embedder, ws)
    return out.sort_values("ood_score", ignore_index=True, na_position="last")


# --------------------------------------------------------------------------- the map

def embedding_map(points: np.ndarray, seed: int = 0, max_points: int = 5000) -> np.ndarray:
    """2-D coordinates of embeddings by scikit-learn's t-SNE (cosine distance).

    t-SNE rather than UMAP: scikit-learn is already here, it needs no numba
    compilation (umap-learn's first call takes longer than a demo-sized map),
    and at a few thousand points it runs in well under a minute on 2 cores.
    Larger sets are subsampled (seeded) to `max_points`; the rest get NaN.

    Returns:
        (n, 2) float array.
    """
    from sklearn.manifold import TSNE

    points = np.asarray(points, dtype=np.float32)
    xy = np.full((len(points), 2), np.nan)
    if len(points) < 5:
        return xy
    keep = np.arange(len(points))
    if len(points) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(points), max_points, False))
    perplexity = float(min(30, max(2, (len(keep) - 1) // 3)))
    xy[keep] = TSNE(2, perplexity=perplexity, metric="cosine", init="pca",
                    random_state=seed).fit_transform(points[keep])
    return xy


def map_frame(ws: Workspace, generation: str = "last", results: pd.DataFrame | None = None,
              marks: dict[str, set[str]] | None = None, seed: int = 0,
              progress: bool = True, embedder: str = MODEL) -> pd.DataFrame:
    """Library (and inbox) images placed on one 2-D map of the generation's embeddings
    (or a pretrained EMBEDDER's: `attrs["embedder"]` says which).

    Args:
        ws: the workspace.
        generation: the generation whose embedding space is mapped.
        results: a bulk-identification table of the same generation (its
            `embedding` column, or its files under a pretrained embedder) to map the
            inbox beside the library; optional.
        marks: name -> library paths or inbox files to mark ("label issue", "ood").
        seed: t-SNE's seed.

    Returns:
        Columns path (library-relative, or the inbox file), where ("library" or
        "inbox"), label (the class, or the predicted class for inbox rows), x, y
        and mark ("" or the first name in `marks` that holds the path).
    """
    name, rows = _library_rows(ws, generation, embedder)
    _, emb = library_features(ws, name, rows, progress=progress, embedder=embedder)
    frame = pd.DataFrame({"path": rows["path"], "where": "library", "label": rows["label"]})
    if results is not None and len(results):
        ok = results[results["error"].fillna("") == ""]
        inbox = (np.stack(ok["embedding"]).astype(np.float32) if embedder == MODEL
                 else vectors(ws, embedder, ok["path"], ok["hash"], progress=progress))
        emb = np.concatenate([emb, inbox])
        frame = pd.concat([frame, pd.DataFrame({"path": ok["path"], "where": "inbox",
                                                "label": ok["pred"]})], ignore_index=True)
    xy = embedding_map(emb, seed)
    frame["x"], frame["y"] = xy[:, 0], xy[:, 1]
    frame["mark"] = ""
    for mark, paths in reversed(list((marks or {}).items())):  # the first name wins
        frame.loc[frame["path"].isin(set(paths)), "mark"] = mark
    frame.attrs["embedder"] = display_name(embedder, ws)
    return frame


def plot_map(frame: pd.DataFrame, path: str | Path | None = None, title: str = ""):
    """The embedding map: a colour per class, inbox images hollow, marked images ringed."""
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab20")
    for k, (label, group) in enumerate(frame.groupby("label")):
        lib, inbox = group[group["where"] == "library"], group[group["where"] == "inbox"]
        ax.scatter(lib["x"], lib["y"], s=8, color=cmap(k % 20), label=label, alpha=0.7)
        ax.scatter(inbox["x"], inbox["y"], s=12, facecolors="none",
                   edgecolors=[cmap(k % 20)], alpha=0.7)
    for mark, style in zip(sorted(set(frame["mark"]) - {""}), ("x", "D", "*", "^")):
        rows = frame[frame["mark"] == mark]
        ax.scatter(rows["x"], rows["y"], s=40, marker=style, color="black", label=mark)
    ax.legend(fontsize=7, markerscale=1.5, loc="best", ncol=2)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title or "embedding map (t-SNE): library filled, inbox hollow")
    return plots.save(fig, path)


def region(frame: pd.DataFrame, x: tuple[float, float], y: tuple[float, float]) -> pd.DataFrame:
    """The map's rows inside a rectangle (x and y ranges, inclusive)."""
    inside = frame["x"].between(*x) & frame["y"].between(*y)
    return frame[inside].reset_index(drop=True)
