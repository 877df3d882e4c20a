"""Evaluating a generation: predictions, figures, the evaluation run, lineage.

The numbers are in metrics.py; candidate versus deployed and promotion in promotion.py.

Everything is computed from a *prediction frame*: one row per image with its
label, the predicted class, the class probabilities and the loss. `predict_rows`
builds one with plain-torch inference (the same preprocessing as serving); the
metric and figure functions take any such frame, so they are testable on a
hand-made one. fastai's ClassificationInterpretation
is not used: it needs a fastai Learner and DataLoaders, and a generation is stored
as timm weights plus model.json, never as a Learner; its `most_confused` and
`plot_top_losses` are `top_confusions` and `plot_top_losses` here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import inference, library, models, splits
from .images import load_rgb
from .metrics import (calibration, confusion, expected_calibration_error, known, summarize,
                      top_confusions)
from .plots import save
from .workspace import Workspace, open_workspace

# --------------------------------------------------------------------------- predictions

def frame_from_probs(labels, probs, classes: list[str], **columns) -> pd.DataFrame:
    """A prediction frame from true labels and class probabilities.

    Args:
        labels: true class names (may hold names outside `classes`).
        probs: array (n, len(classes)) of probabilities.
        classes: the generation's ordered class list.
        **columns: extra columns (path, source, ...) of length n.

    Returns:
        Columns label, pred, confidence, correct, loss (NaN when the label is not
        in `classes`), probs (one array per row) and the extra columns.
    """
    probs = np.asarray(probs, dtype=float).reshape(len(labels), len(classes))
    labels = pd.Series(list(labels), dtype=object)
    index = {c: i for i, c in enumerate(classes)}
    idx = labels.map(index)
    p_true = np.array([probs[r, int(i)] if pd.notna(i) else np.nan for r, i in enumerate(idx)])
    frame = pd.DataFrame({
        "label": labels,
        "pred": [classes[i] for i in probs.argmax(axis=1)] if len(probs) else [],
        "confidence": probs.max(axis=1) if len(probs) else [],
        "loss": -np.log(np.clip(p_true, 1e-12, None)),
    })
    frame["correct"] = frame["label"] == frame["pred"]
    frame["probs"] = list(probs)
    for name, values in columns.items():
        frame[name] = list(values)
    return frame


def predict_rows(ws: Workspace, generation: str, rows: pd.DataFrame,
                 batch_size: int = 64, loaded: inference.Loaded | None = None,
                 tta: bool = False) -> pd.DataFrame:
    """Predict manifest rows (path relative to the library, label) with a generation.

    Args:
        ws: the workspace.
        generation: a generation name or "last".
        rows: manifest rows; `source` is kept when present.
        batch_size: images per forward pass.
        loaded: an already loaded generation (skips loading).
        tta: multi-crop test-time augmentation (`inference.tta_views`: the image, its
            mirror and both shifted a pixel each way; six passes).

    Returns:
        A prediction frame (see `frame_from_probs`) with columns path and source.
    """
    loaded = loaded or inference.load(ws, generation)
    paths = list(rows["path"])
    probs = inference.library_outputs(ws, loaded, paths, batch_size, tta=tta or loaded.tta,
                                      keys=("probs",))["probs"]
    probs = probs if len(probs) else np.zeros((0, len(loaded.classes)))
    source = rows["source"] if "source" in rows else ["real"] * len(rows)
    return frame_from_probs(rows["label"], probs, loaded.classes, path=paths, source=source)


# --------------------------------------------------------------------------- figures

def plot_confusion(cm: pd.DataFrame, path: str | Path | None = None, title: str = ""):
    """A normalised confusion matrix that stays readable with many classes.

    Classes are sorted by recall, worst first, so problems gather in the top left;
    cell values are written only up to 15 classes, and label size shrinks with the count.
    """
    order = np.argsort(np.diag(cm.to_numpy()), kind="stable")
    m = cm.iloc[order, order]
    n = len(m)
    side = min(4 + 0.22 * n, 22)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(np.ma.masked_less(m.to_numpy(), 0.005), cmap="Blues", vmin=0, vmax=1)
    font = max(4, min(9, 300 // max(n, 1)))
    ax.set_xticks(range(n), m.columns, rotation=90, fontsize=font)
    ax.set_yticks(range(n), m.index, fontsize=font)
    ax.set_xlabel("predicted"); ax.set_ylabel("true (sorted by recall, worst first)")
    if n <= 15:
        for (i, j), v in np.ndenumerate(m.to_numpy()):
            if v >= 0.005:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_title(title or "Confusion matrix (row-normalised)")
    return save(fig, path)


def plot_top_losses(frame: pd.DataFrame, library_root: Path, k: int = 16,
                    path: str | Path | None = None):
    """A grid of the `k` images with the highest loss: true/predicted, loss, confidence."""
    worst = frame.dropna(subset=["loss"]).nlargest(k, "loss")
    cols = 4
    rows = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, worst.itertuples()):
        ax.imshow(load_rgb(Path(library_root) / r.path))
        ax.set_title(f"{r.label} -> {r.pred}\nloss {r.loss:.2f}, p {r.confidence:.2f}",
                     fontsize=8, color="tab:red" if r.label != r.pred else "black")
    fig.suptitle("Top losses (true -> predicted)")
    return save(fig, path)


def plot_calibration(frame: pd.DataFrame, n_bins: int = 10, path: str | Path | None = None):
    """Confidence histogram (correct vs wrong) and reliability diagram with the ECE."""
    t = calibration(frame, n_bins)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    bins = np.linspace(0, 1, n_bins + 1)
    ax1.hist([frame.loc[frame["correct"], "confidence"], frame.loc[~frame["correct"], "confidence"]],
             bins=bins, stacked=True, label=["correct", "wrong"], color=["tab:green", "tab:red"])
    ax1.set_xlabel("confidence"); ax1.set_ylabel("images"); ax1.legend()
    mid = (t["lower"] + t["upper"]) / 2
    ax2.bar(mid, t["accuracy"].fillna(0), width=1 / n_bins, edgecolor="k", alpha=0.7)
    ax2.plot([0, 1], [0, 1], "k--", lw=1)
    ax2.set_xlabel("confidence"); ax2.set_ylabel("accuracy"); ax2.set_xlim(0, 1); ax2.set_ylim(0, 1)
    ax2.set_title(f"Reliability (ECE {expected_calibration_error(frame, n_bins):.3f})")
    return save(fig, path)


# --------------------------------------------------------------------------- one generation

@dataclass
class Evaluation:
    """A generation's predictions on its test split and on the benchmark, and the numbers."""

    name: str
    info: dict
    test: pd.DataFrame = field(repr=False)
    benchmark: pd.DataFrame = field(repr=False)
    metrics: dict = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]


def evaluate(workspace, generation: str = "last", report_dir: str | Path | None = None,
             top_losses: int = 16, n_bins: int = 10, save: bool = True,
             tta: bool = False) -> Evaluation:
    """Evaluate a generation on its own test split and on the benchmark set.

    Test and benchmark images that the generation or any ancestor trained on are
    left out and counted (`left_out_trained` in each part's metrics).

    Args:
        workspace: a workspace path or Workspace.
        generation: a generation name or "last".
        report_dir: where figures go (confusion, top losses, calibration); none if None.
        top_losses: images in the top-losses grid.
        n_bins: confidence bins for calibration.
        save: merge the numbers into the generation's model.json.
        tta: multi-crop test-time augmentation (`inference.tta_views`).

    Returns:
        The Evaluation; `metrics` holds {"test": ..., "benchmark": ..., "tta": bool}.
    """
    ws = open_workspace(workspace)
    loaded = inference.load(ws, generation)
    classes = loaded.classes
    manifest = library.scan(ws, progress=False)
    seen = splits.trained_hashes(ws, loaded.name)
    test_in, n_test = splits.drop_trained(ws, splits.test_rows(ws, loaded.name, manifest,
                                                               classes), seen)
    bench_in, n_bench = splits.drop_trained(ws, splits.benchmark_rows(ws, manifest), seen)
    if n_test or n_bench:  # e.g. a rewritten image that moved split between generations
        print(f"left out {n_test} test and {n_bench} benchmark image(s) that {loaded.name} or "
              "an ancestor trained on")
    test = predict_rows(ws, loaded.name, test_in, loaded=loaded, tta=tta)
    bench = predict_rows(ws, loaded.name, bench_in, loaded=loaded, tta=tta)
    metrics = {"test": summarize(test, classes, n_bins), "benchmark": summarize(bench, classes, n_bins)}
    metrics["test"]["left_out_trained"] = n_test
    metrics["benchmark"]["left_out_trained"] = n_bench
    for part, frame in (("test", test), ("benchmark", bench)):
        metrics[part]["top_confusions"] = top_confusions(frame, classes).to_dict(orient="records")
    if report_dir is not None:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_confusion(confusion(test, classes), out / "confusion_test.png",
                       f"{loaded.name}: test split (row-normalised)")
        plot_confusion(confusion(bench, classes), out / "confusion_benchmark.png",
                       f"{loaded.name}: benchmark (row-normalised)")
        plot_top_losses(known(test, classes), ws.library, top_losses, out / "top_losses.png")
        plot_calibration(known(test, classes), n_bins, out / "calibration.png")
        plt.close("all")
    metrics["tta"] = bool(tta)
    metrics["tta_views"] = inference.TTA_NAME if tta else None
    if save:
        _save_to_model_json(ws, loaded.name, metrics)
    return Evaluation(loaded.name, models.read_info(ws, loaded.name), test, bench, metrics)


def _save_to_model_json(ws: Workspace, name: str, metrics: dict) -> None:
    info = models.read_info(ws, name)
    headline = {f"{part}_{key}": metrics[part][key] for part in ("test", "benchmark")
                for key in ("accuracy", "macro_f1", "roc_auc_ovr", "ece")}
    models.update_info(ws, name, metrics={**info.get("metrics", {}), **headline},
                       evaluation={**metrics,
                                   "evaluated_at": datetime.now(timezone.utc).isoformat()})


# --------------------------------------------------------------------------- lineage

def lineage(workspace) -> pd.DataFrame:
    """One row per generation: parent, classes added, head init, plateau, accuracies, flags."""
    ws = open_workspace(workspace)
    current = models.deployed_name(ws)
    rows = []
    for name in models.generation_names(ws):
        info = models.read_info(ws, name)
        m = info.get("metrics", {})
        added = info.get("classes_added", info["classes"] if not info.get("parent") else [])
        rows.append({
            "generation": name, "parent": info.get("parent"), "classes": len(info["classes"]),
            "classes_added": ", ".join(added), "init": info.get("init"),
            "head_init": info.get("head_init"), "plateau_epoch": m.get("plateau_epoch"),
            "epochs_run": m.get("epochs_run"), "valid_accuracy": m.get("valid_accuracy"),
            "test_accuracy": m.get("test_accuracy"),
            "benchmark_accuracy": m.get("benchmark_accuracy"),
            "throwaway": bool(info.get("throwaway", False)), "deployed": name == current})
    cols = ["generation", "parent", "classes", "classes_added", "init", "head_init",
            "plateau_epoch", "epochs_run", "valid_accuracy", "test_accuracy",
            "benchmark_accuracy", "throwaway", "deployed"]
    return pd.DataFrame(rows, columns=cols)


def plot_lineage(table: pd.DataFrame, path: str | Path | None = None):
    """Validation, test and benchmark accuracy across generations; the deployed one starred."""
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(table) + 2), 3.4))
    x = np.arange(len(table))
    for col in ("valid_accuracy", "test_accuracy", "benchmark_accuracy"):
        ax.plot(x, pd.to_numeric(table[col], errors="coerce"), "o-", label=col.split("_")[0])
    dep = table.index[table["deployed"]]
    if len(dep):
        i = table.index.get_loc(dep[0])
        y = pd.to_numeric(table["benchmark_accuracy"], errors="coerce").iloc[i]
        y = pd.to_numeric(table["valid_accuracy"], errors="coerce").iloc[i] if pd.isna(y) else y
        ax.plot(i, y, "*", ms=16, color="gold", mec="k", label="deployed")
    labels = [g + (" (throw-away)" if t else "") for g, t in zip(table["generation"],
                                                                 table["throwaway"])]
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1); ax.set_ylabel("accuracy"); ax.legend(fontsize=8)
    ax.set_title("Accuracy across generations")
    return save(fig, path)
