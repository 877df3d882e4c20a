"""Out-of-fold predictions in seconds: a linear probe on the curation embedding.

cleanlab needs, for each library image, class probabilities from a model that
did not see it. Fold models (`cleaning.out_of_fold`) give them at the cost of k
training runs. With a pretrained backbone configured (`embedder`), a
scikit-learn logistic regression on its vectors gives them in seconds: fit on
k-1 folds, predict the held-out one (stratified, seeded). This is what
cleanlab's own examples do with a frozen feature extractor.

The rows are the library's readable, non-discarded images of the training
classes (each content once), with their current splits, in the table format of
`cleaning.out_of_fold` (generation "probe", fold = the fold that held it out), so
`cleaning.label_issues`, `overlapping_classes` and the map read it unchanged.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import embedder, library, models, splits
from .workspace import Workspace, ZoolibError

FOLDS = 5
# The regularisation of the probe (sklearn's C, on standardised features). Chosen on
# bench/label_issues.py's library (planted flips in 9,000 cifar10/train animals, Lite0
# vectors, 5 folds): out-of-fold accuracy against the given labels 0.724 at C=0.005,
# 0.696 at 0.02, 0.678 at 0.1; cleanlab's precision 0.22 / 0.18 / 0.15 at recall ~0.75-0.8.
C = 0.005
MIN_IMAGES = 40  # the workbench's default cutoff, for a library with no generation yet


def rows_to_clean(ws: Workspace, generation: str | None = "last",
                  min_images: int = MIN_IMAGES) -> tuple[pd.DataFrame, list[str]]:
    """The library rows (path, hash, label, split) to clean, and their classes.

    The classes are the generation's when one exists, else those over the cutoff;
    the rows are as training sees them (`splits.split_manifest`: discarded images
    and contents filed under two classes left out), each content once.
    """
    manifest = library.scan(ws, progress=False)
    if generation and models.generation_names(ws):
        name = models.resolve_generation(ws, generation, include_throwaway=True)
        classes = list(models.read_info(ws, name)["classes"])
    else:
        classes = library.training_classes(manifest, min_images, library.discarded_paths(ws))
    rows = splits.split_manifest(ws, manifest, classes).drop_duplicates("hash")
    return rows[["path", "hash", "label", "split"]].reset_index(drop=True), classes


def out_of_fold(ws: Workspace, value: str, generation: str | None = "last", folds: int = FOLDS,
                c: float = C, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Out-of-fold class probabilities of every library image by a linear probe.

    Args:
        ws: the workspace.
        value: the EMBEDDER (a pretrained backbone; see `embedder`).
        generation: whose classes (None or no generation: the classes over the cutoff).
        folds: k of the stratified k-fold (at least 2).
        c: the inverse regularisation strength of the logistic regression.
        seed: the folds' shuffle.
        progress: the embedding pass's progress bar.

    Returns:
        The table of `cleaning.out_of_fold` (path, hash, label, split, fold,
        generation "probe", probs over `attrs["classes"]`); `attrs["predicted_by"]`
        names the probe and its embedder.

    Raises:
        ZoolibError: fewer than 2 folds, or a class with fewer images than folds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows, classes = rows_to_clean(ws, generation)
    if int(folds) < 2:
        raise ZoolibError(f"FOLDS must be at least 2 for out-of-fold predictions, got {folds}")
    counts = rows["label"].value_counts()
    if counts.min() < folds:
        raise ZoolibError(f"class {counts.idxmin()!r} has {counts.min()} images, fewer than "
                          f"FOLDS={folds}: lower FOLDS or add images")
    x = embedder.library_vectors(ws, value, rows, progress=progress)
    y = rows["label"].map({c_: i for i, c_ in enumerate(classes)}).to_numpy()
    probs, fold = np.zeros((len(rows), len(classes))), np.zeros(len(rows), int)
    split = StratifiedKFold(int(folds), shuffle=True, random_state=seed)
    for k, (fit, held) in enumerate(split.split(x, y)):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        probe.fit(x[fit], y[fit])
        probs[np.ix_(held, probe[-1].classes_)] = probe.predict_proba(x[held])
        fold[held] = k
    table = rows.assign(fold=fold, generation="probe", probs=list(probs))
    table.attrs.update(classes=classes, generations=["probe"], folds=int(folds), init="probe",
                       predicted_by=f"linear probe on {embedder.display_name(value, ws)}")
    return table
