"""The inbox half of bench/replicate.py: bulk identification with generation 1.

An inbox of unseen cifar10/train images of the six animals plus the four vehicles
(junk) is identified with a seed's generation 1, which lacks the classes that
arrive later. Two figures, as the practitioner uses them:

(a) look-alike discovery: among inbox images predicted below `--threshold`
    confidence as the first arriving class's look-alike (the class generation 1
    most often gives that class's labelled images, those it arrives with), the
    share that truly is the arriving class, over its share of the inbox (the
    enrichment factor);
(b) mass removal: ROC AUC of each score at separating junk from animals, the
    default of `bulkid.lowest_scores` among them.
"""
from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from zoolib import bulkid, evaluate  # noqa: E402

THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01]  # 1.01: every look-alike prediction
ENRICHMENT_GOAL = 3.0


def lookalike_of(ws, generation: str, cls: str, files: list[Path]) -> tuple[str, dict[str, int]]:
    """The class `generation` most often gives `files`, the arriving class's labelled images.

    These are the images the class arrives with in the library (the next
    generation's training data), not inbox or test images, so choosing the
    look-alike uses no answer key the practitioner lacks.
    """
    rows = pd.DataFrame({"path": [str(f.resolve()) for f in files], "label": cls})
    counts = evaluate.predict_rows(ws, generation, rows)["pred"].value_counts()
    return str(counts.index[0]), {str(k): int(v) for k, v in counts.items()}


def enrichment(results: pd.DataFrame, truth: pd.DataFrame, holdout: str, lookalike: str,
               threshold: float) -> dict:
    """Look-alike discovery with `bulkid.lookalikes` at one confidence threshold.

    Returns:
        candidates, holdout_found, share (held-out among candidates), base_share
        (held-out in the readable inbox), enrichment (share / base_share; NaN when no
        candidate) and recall (share of the inbox's held-out images found).
    """
    labels = truth.set_index("path")["label"]
    ok = results[results["error"].fillna("") == ""]
    found = bulkid.lookalikes(ok, lookalike, max_confidence=threshold)
    is_hold = found["path"].map(labels) == holdout
    base = float((ok["path"].map(labels) == holdout).mean())
    share = float(is_hold.mean()) if len(found) else float("nan")
    n_hold = int((ok["path"].map(labels) == holdout).sum())
    return {"threshold": threshold, "candidates": int(len(found)),
            "holdout_found": int(is_hold.sum()), "share": share, "base_share": base,
            "enrichment": share / base if base else float("nan"),
            "recall": int(is_hold.sum()) / n_hold if n_hold else float("nan")}


def junk_scores(results: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """ROC AUC of each score `bulkid.lowest_scores` can sort by at separating junk from animals.

    Returns:
        One row per score: auc, junk_in_bottom (the share of junk among the `n_junk`
        rows `lowest_scores` lists first by that score) and default (the score
        `lowest_scores` sorts by when not told).
    """
    ok = results[results["error"].fillna("") == ""]
    is_junk = ok["path"].map(truth.set_index("path")["junk"]).astype(bool)
    rows = []
    for score, low_is_bad in bulkid.MASS_REMOVAL_SCORES.items():
        if score not in ok or ok[score].isna().all():
            continue
        badness = -ok[score].to_numpy() if low_is_bad else ok[score].to_numpy()
        auc = roc_auc_score(is_junk, badness) if 0 < is_junk.sum() < len(ok) else float("nan")
        bottom = bulkid.lowest_scores(ok, n=int(is_junk.sum()), by=score)
        rows.append({"score": score, "auc": float(auc),
                     "junk_in_bottom": float(is_junk[bottom.index].mean()) if len(bottom)
                     else float("nan"),
                     "default": score == bulkid.mass_removal_score(ok)})
    return pd.DataFrame(rows)


def plot_inbox(table: pd.DataFrame, results: pd.DataFrame, truth: pd.DataFrame,
               scores: pd.DataFrame, holdout: str, lookalike: str, path: Path) -> None:
    """Enrichment per threshold and the junk-removal ROC curve of every score."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(table["threshold"].clip(upper=1.0), table["enrichment"], "o-")
    ax1.axhline(ENRICHMENT_GOAL, color="tab:red", ls="--", label="goal 3x")
    ax1.axhline(1.0, color="gray", ls=":", label="no enrichment")
    ax1.set_xlabel(f"confidence below (predicted {lookalike})")
    ax1.set_ylabel(f"enrichment of {holdout}"); ax1.legend()
    ax1.set_title(f"Look-alike discovery: {holdout} among low-confidence {lookalike}")
    ok = results[results["error"].fillna("") == ""]
    junk = ok["path"].map(truth.set_index("path")["junk"]).astype(bool)
    for row in scores.itertuples():
        low_is_bad = bulkid.MASS_REMOVAL_SCORES[row.score]
        fpr, tpr, _ = roc_curve(junk, -ok[row.score] if low_is_bad else ok[row.score])
        ax2.plot(fpr, tpr, lw=2.5 if row.default else 1.2,
                 label=f"{row.score} (AUC {row.auc:.3f}){' default' if row.default else ''}")
    ax2.plot([0, 1], [0, 1], color="gray", ls=":")
    ax2.set_xlabel("animals flagged"); ax2.set_ylabel("junk flagged"); ax2.legend()
    ax2.set_title("Mass removal: junk (vehicles) versus animals")
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def inbox_part(ws, generation: str, truth: pd.DataFrame, holdout: str, holdout_files: list[Path],
               threshold: float, workers: int | None, out: Path, tag: str,
               embedder: str = "") -> dict:
    """Identify the inbox with `generation`; write the tables and plot; return the figures.

    Args:
        ws: the seed's workspace (its inbox already placed).
        generation: the seed's generation 1.
        truth: the inbox's answer key (`cifar.link_inbox`).
        holdout: the class that arrives first, absent from `generation`.
        holdout_files: the images it arrives with (the look-alike is chosen on them).
        threshold: look-alike candidates are predicted below this confidence.
        workers: bulkid's decoding processes (None: its default).
        out: the report folder; files are suffixed with `tag` (e.g. "s0").
        tag: the seed's suffix.
        embedder: a pretrained EMBEDDER: the inbox is identified a second time with
            its knn score, beside the model's (`bulkid.embedded`); "" for none.

    Returns:
        seconds (bulkid), lookalike (class, counts and the figures at `threshold`),
        enrichment (every threshold) and junk_scores (one row per score; with an
        embedder, also embedder_junk (its knn row, named) and embedder_seconds).
    """
    t = time.perf_counter()
    results = bulkid.run(ws, generation, batch_size=256, num_workers=workers, progress=False)
    seconds = round(time.perf_counter() - t, 1)
    look, counts = lookalike_of(ws, generation, holdout, holdout_files)
    table = pd.DataFrame([enrichment(results, truth, holdout, look, th)
                          for th in sorted(set(THRESHOLDS + [threshold]))])
    scores = junk_scores(results, truth)
    extra = embedder_junk(ws, generation, truth, embedder, workers) if embedder else {}
    plot_inbox(table, results, truth, scores, holdout, look, out / f"inbox_{tag}.png")
    table.to_csv(out / f"enrichment_{tag}.csv", index=False)
    scores.to_csv(out / f"junk_scores_{tag}.csv", index=False)
    return {"seconds": seconds, "holdout": holdout,
            "lookalike": {"class": look, "counts": counts,
                          **enrichment(results, truth, holdout, look, threshold)},
            "enrichment": table.to_dict(orient="records"),
            "junk_scores": scores.to_dict(orient="records"), **extra}


def embedder_junk(ws, generation: str, truth: pd.DataFrame, embedder: str,
                  workers: int | None) -> dict:
    """The inbox identified again with a pretrained embedder's knn score: its junk AUC."""
    from zoolib.embedder import display_name

    t = time.perf_counter()
    results = bulkid.run(ws, generation, name=f"{generation}-embedder", batch_size=64,
                         num_workers=workers, progress=False, embedder=embedder)
    seconds = round(time.perf_counter() - t, 1)
    row = junk_scores(results, truth).set_index("score").loc["knn"]
    return {"embedder_seconds": seconds,
            "embedder_junk": {"embedder": display_name(embedder, ws), "auc": float(row["auc"]),
                              "junk_in_bottom": float(row["junk_in_bottom"])}}
