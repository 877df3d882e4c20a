"""The numbers of one generation, from a prediction frame.

A prediction frame is one row per image with its `label`, the predicted class
`pred`, `correct`, `confidence`, the class probabilities `probs` and `source`
(evaluate.predict_rows makes one); every function here takes any such frame, so
they are testable on a hand-made one. Statistics come from scikit-learn.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score


def known(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """The rows whose true label is one of the generation's classes."""
    return frame[frame["label"].isin(classes)]


def per_class(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1, support and one-vs-rest ROC AUC of each class.

    AUC is NaN for a class without positive or without negative images.
    """
    f = known(frame, classes)
    p, r, f1, n = precision_recall_fscore_support(f["label"], f["pred"], labels=classes,
                                                  zero_division=0)
    probs = np.stack(f["probs"].to_numpy()) if len(f) else np.zeros((0, len(classes)))
    auc = []
    for i, c in enumerate(classes):
        y = (f["label"] == c).to_numpy()
        auc.append(roc_auc_score(y, probs[:, i]) if 0 < y.sum() < len(y) else np.nan)
    return pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f1,
                         "support": n, "roc_auc": auc})


def calibration(frame: pd.DataFrame, n_bins: int = 10) -> pd.DataFrame:
    """Reliability table: equal-width confidence bins with count, mean confidence, accuracy."""
    edges = np.linspace(0, 1, n_bins + 1)
    b = np.clip(np.digitize(frame["confidence"], edges[1:-1], right=True), 0, n_bins - 1)
    g = frame.assign(bin=b).groupby("bin")
    table = pd.DataFrame({"lower": edges[:-1], "upper": edges[1:]})
    table["count"] = g.size().reindex(range(n_bins), fill_value=0).to_numpy()
    table["confidence"] = g["confidence"].mean().reindex(range(n_bins)).to_numpy()
    table["accuracy"] = g["correct"].mean().reindex(range(n_bins)).to_numpy()
    return table


def expected_calibration_error(frame: pd.DataFrame, n_bins: int = 10) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over the bins."""
    t = calibration(frame, n_bins).dropna()
    total = t["count"].sum()
    return float((t["count"] * (t["confidence"] - t["accuracy"]).abs()).sum() / total) \
        if total else float("nan")


def accuracy_by_source(frame: pd.DataFrame) -> pd.DataFrame:
    """Images and accuracy per image source (real / staged / synthetic)."""
    g = frame.groupby("source")["correct"]
    return pd.DataFrame({"images": g.size(), "accuracy": g.mean()}).reset_index()


def confusion(frame: pd.DataFrame, classes: list[str], normalize: bool = True) -> pd.DataFrame:
    """Confusion matrix (rows: true class, columns: predicted), row-normalised by default."""
    f = known(frame, classes)
    cm = confusion_matrix(f["label"], f["pred"], labels=classes,
                          normalize="true" if normalize else None)
    return pd.DataFrame(np.nan_to_num(cm), index=pd.Index(classes, name="true"),
                        columns=pd.Index(classes, name="predicted"))


def top_confusions(frame: pd.DataFrame, classes: list[str], n: int = 10) -> pd.DataFrame:
    """The most frequent mistakes: true, predicted, count and share of the true class."""
    f = known(frame, classes)
    wrong = f[~f["correct"]]
    counts = wrong.groupby(["label", "pred"]).size().rename("count").reset_index()
    counts["share"] = counts["count"] / counts["label"].map(f["label"].value_counts())
    counts = counts.rename(columns={"label": "true", "pred": "predicted"})
    return counts.sort_values(["count", "true", "predicted"], ascending=[False, True, True],
                              ignore_index=True).head(n)


def confused_pairs(frame: pd.DataFrame, classes: list[str], n: int = 10) -> pd.DataFrame:
    """Unordered class pairs by mistakes in both directions (a->b plus b->a)."""
    t = top_confusions(frame, classes, n=len(classes) ** 2)
    pair = [tuple(sorted(p)) for p in zip(t["true"], t["predicted"])]
    t = t.assign(a=[p[0] for p in pair], b=[p[1] for p in pair])
    out = t.groupby(["a", "b"])["count"].sum().rename("count").reset_index()
    return out.sort_values(["count", "a", "b"], ascending=[False, True, True],
                           ignore_index=True).head(n)


def summarize(frame: pd.DataFrame, classes: list[str], n_bins: int = 10) -> dict:
    """Headline numbers of a prediction frame (JSON-ready)."""
    f = known(frame, classes)
    table = per_class(frame, classes)
    present = table[table["support"] > 0]
    return {
        "images": int(len(f)), "not_in_classes": int(len(frame) - len(f)),
        "accuracy": float(f["correct"].mean()) if len(f) else float("nan"),
        "macro_precision": float(present["precision"].mean()),
        "macro_recall": float(present["recall"].mean()),
        "macro_f1": float(present["f1"].mean()),
        "roc_auc_ovr": float(table["roc_auc"].mean()),
        "ece": expected_calibration_error(f, n_bins),
        "per_class": table.set_index("class").drop(columns="support").round(4)
                          .to_dict(orient="index"),
        "by_source": accuracy_by_source(f).set_index("source")["accuracy"].round(4).to_dict(),
    }
