"""Evaluating a generation, comparing it with the deployed one, promotion, lineage.

Everything is computed from a *prediction frame*: one row per image with its
label, the predicted class, the class probabilities and the loss. `predict_rows`
builds one with plain-torch inference (the same preprocessing as serving); the
metric and figure functions take any such frame, so they are testable on a
hand-made one. Metrics come from scikit-learn. fastai's ClassificationInterpretation
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
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from . import inference, journal, library, models, splits
from .images import load_rgb
from .workspace import Workspace, ZoolibError, open_workspace

_EPS = 1e-9  # thresholds are inclusive: float noise must not flip a decision


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
        tta: average the predictions of each image and its mirror image.

    Returns:
        A prediction frame (see `frame_from_probs`) with columns path and source.
    """
    loaded = loaded or inference.load(ws, generation)
    probs = []
    paths = list(rows["path"])
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([inference.to_tensor(load_rgb(ws.library / p), loaded.info)
                             for p in paths[start:start + batch_size]])
        probs.append(inference.forward(loaded, batch, tta=tta)[0].numpy())
    probs = np.concatenate(probs) if probs else np.zeros((0, len(loaded.classes)))
    source = rows["source"] if "source" in rows else ["real"] * len(rows)
    return frame_from_probs(rows["label"], probs, loaded.classes, path=paths, source=source)


def split_rows(ws: Workspace, manifest: pd.DataFrame, classes: list[str],
               split: str = "test") -> pd.DataFrame:
    """The rows of one split ("test" by default) of a generation's classes."""
    data = splits.split_manifest(ws, manifest, classes)
    return data[data["split"] == split].reset_index(drop=True)


def benchmark_rows(ws: Workspace, manifest: pd.DataFrame) -> pd.DataFrame:
    """The frozen benchmark images still in the library, with current path, label, source.

    Labels of every class are returned; a generation scores those in its class list.
    """
    frozen = splits.benchmark_set(ws, manifest)
    ok = manifest[manifest["readable"]].drop_duplicates("hash")
    return frozen[["hash"]].merge(ok, on="hash").sort_values("path", ignore_index=True)


# --------------------------------------------------------------------------- metrics

def _known(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    return frame[frame["label"].isin(classes)]


def per_class(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1, support and one-vs-rest ROC AUC of each class.

    AUC is NaN for a class without positive or without negative images.
    """
    f = _known(frame, classes)
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
    f = _known(frame, classes)
    cm = confusion_matrix(f["label"], f["pred"], labels=classes,
                          normalize="true" if normalize else None)
    return pd.DataFrame(np.nan_to_num(cm), index=pd.Index(classes, name="true"),
                        columns=pd.Index(classes, name="predicted"))


def top_confusions(frame: pd.DataFrame, classes: list[str], n: int = 10) -> pd.DataFrame:
    """The most frequent mistakes: true, predicted, count and share of the true class."""
    f = _known(frame, classes)
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
    f = _known(frame, classes)
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


# --------------------------------------------------------------------------- figures

def _save(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    """Evaluate a generation on its test split and on the benchmark set.

    Args:
        workspace: a workspace path or Workspace.
        generation: a generation name or "last".
        report_dir: where figures go (confusion, top losses, calibration); none if None.
        top_losses: images in the top-losses grid.
        n_bins: confidence bins for calibration.
        save: merge the numbers into the generation's model.json.
        tta: flip test-time augmentation (each image and its mirror, averaged).

    Returns:
        The Evaluation; `metrics` holds {"test": ..., "benchmark": ..., "tta": bool}.
    """
    ws = open_workspace(workspace)
    loaded = inference.load(ws, generation)
    classes = loaded.classes
    manifest = library.scan(ws, progress=False)
    test = predict_rows(ws, loaded.name, split_rows(ws, manifest, classes), loaded=loaded,
                        tta=tta)
    bench = predict_rows(ws, loaded.name, benchmark_rows(ws, manifest), loaded=loaded, tta=tta)
    metrics = {"test": summarize(test, classes, n_bins), "benchmark": summarize(bench, classes, n_bins)}
    for part, frame in (("test", test), ("benchmark", bench)):
        metrics[part]["top_confusions"] = top_confusions(frame, classes).to_dict(orient="records")
    if report_dir is not None:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_confusion(confusion(test, classes), out / "confusion_test.png",
                       f"{loaded.name}: test split (row-normalised)")
        plot_confusion(confusion(bench, classes), out / "confusion_benchmark.png",
                       f"{loaded.name}: benchmark (row-normalised)")
        plot_top_losses(_known(test, classes), ws.library, top_losses, out / "top_losses.png")
        plot_calibration(_known(test, classes), n_bins, out / "calibration.png")
        plt.close("all")
    metrics["tta"] = bool(tta)
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


# --------------------------------------------------------------------------- candidate vs deployed

@dataclass
class Comparison:
    """Two generations on the same benchmark images.

    Attributes:
        candidate, baseline: generation names.
        shared: classes in both class lists (the fair comparison).
        new: classes only the candidate has (reported separately).
        removed: classes only the baseline has.
        per_class: class, images, baseline, candidate, change (accuracy on shared classes).
        new_classes: class, images, candidate accuracy on the new classes.
        baseline_accuracy, candidate_accuracy: on images of the shared classes.
    """

    candidate: str
    baseline: str
    shared: list[str]
    new: list[str]
    removed: list[str]
    per_class: pd.DataFrame
    new_classes: pd.DataFrame
    baseline_accuracy: float
    candidate_accuracy: float
    images: int

    @property
    def gain(self) -> float:
        return self.candidate_accuracy - self.baseline_accuracy

    def summary(self) -> dict:
        """JSON-ready headline of the comparison."""
        return {"candidate": self.candidate, "baseline": self.baseline, "images": self.images,
                "baseline_accuracy": self.baseline_accuracy,
                "candidate_accuracy": self.candidate_accuracy, "gain": self.gain,
                "shared": self.shared, "new": self.new, "removed": self.removed,
                "per_class": self.per_class.set_index("class").round(4).to_dict(orient="index"),
                "new_classes": self.new_classes.set_index("class").round(4)
                                   .to_dict(orient="index")}

    def side_by_side(self) -> pd.DataFrame:
        """Per-class table plus an "all shared classes" row, for display."""
        total = pd.DataFrame([{"class": "(all shared classes)", "images": self.images,
                               "baseline": self.baseline_accuracy,
                               "candidate": self.candidate_accuracy, "change": self.gain}])
        return pd.concat([self.per_class, total], ignore_index=True).rename(
            columns={"baseline": self.baseline, "candidate": self.candidate})


def compare_frames(candidate: pd.DataFrame, candidate_classes: list[str], candidate_name: str,
                   baseline: pd.DataFrame, baseline_classes: list[str], baseline_name: str
                   ) -> Comparison:
    """Compare two prediction frames of the same images (matched by path).

    Raises:
        ZoolibError: the frames do not hold the same images.
    """
    if sorted(candidate["path"]) != sorted(baseline["path"]):
        raise ZoolibError(f"{candidate_name} and {baseline_name} were not predicted on the "
                          "same images")
    shared = [c for c in candidate_classes if c in baseline_classes]
    new = [c for c in candidate_classes if c not in baseline_classes]
    removed = [c for c in baseline_classes if c not in candidate_classes]
    both = candidate[["path", "label", "correct"]].merge(
        baseline[["path", "correct"]], on="path", suffixes=("_c", "_b"))
    on_shared = both[both["label"].isin(shared)]
    g = on_shared.groupby("label")
    per_class = pd.DataFrame({"images": g.size(), "baseline": g["correct_b"].mean(),
                              "candidate": g["correct_c"].mean()}).reindex(shared)
    per_class = per_class.dropna(subset=["images"]).rename_axis("class").reset_index()
    per_class["images"] = per_class["images"].astype(int)
    per_class["change"] = per_class["candidate"] - per_class["baseline"]
    on_new = both[both["label"].isin(new)].groupby("label")["correct_c"]
    new_classes = pd.DataFrame({"images": on_new.size(), "candidate": on_new.mean()}
                               ).rename_axis("class").reset_index()
    acc = lambda col: float(on_shared[col].mean()) if len(on_shared) else float("nan")  # noqa: E731
    return Comparison(candidate_name, baseline_name, shared, new, removed, per_class,
                      new_classes, acc("correct_b"), acc("correct_c"), int(len(on_shared)))


def compare(workspace, candidate: str = "last", baseline: str = "deployed",
            candidate_frame: pd.DataFrame | None = None, tta: bool = False) -> Comparison:
    """Predict the benchmark images with both generations and compare them.

    Args:
        workspace: a workspace path or Workspace.
        candidate: a generation name or "last".
        baseline: a generation name or "deployed".
        candidate_frame: the candidate's benchmark predictions, if already made
            (with the same `tta` as the baseline's, for a fair comparison).
        tta: flip test-time augmentation for both generations.

    Raises:
        ZoolibError: baseline "deployed" while nothing is deployed.
    """
    ws = open_workspace(workspace)
    candidate = models.resolve_generation(ws, candidate, include_throwaway=True)
    baseline = deployed_name(ws) if baseline == "deployed" else baseline
    if baseline is None:
        raise ZoolibError(f"nothing is deployed yet in {ws.models}: nothing to compare with")
    rows = benchmark_rows(ws, library.scan(ws, progress=False))
    cand = (candidate_frame if candidate_frame is not None
            else predict_rows(ws, candidate, rows, tta=tta))
    base = predict_rows(ws, baseline, rows, tta=tta)
    return compare_frames(cand, models.read_info(ws, candidate)["classes"], candidate,
                          base, models.read_info(ws, baseline)["classes"], baseline)


def plot_comparison(comp: Comparison, path: str | Path | None = None):
    """Per-class benchmark accuracy of baseline and candidate side by side, new classes apart."""
    t = comp.per_class
    n = len(t) + len(comp.new_classes)
    fig, ax = plt.subplots(figsize=(7, 0.32 * n + 1.5))
    y = np.arange(len(t))
    ax.barh(y - 0.2, t["baseline"], 0.4, label=comp.baseline, color="tab:gray")
    ax.barh(y + 0.2, t["candidate"], 0.4, label=comp.candidate, color="tab:blue")
    yn = np.arange(len(t), n)
    ax.barh(yn + 0.2, comp.new_classes["candidate"], 0.4, color="tab:orange",
            label=f"{comp.candidate}, new classes")
    ax.set_yticks(list(y) + list(yn), list(t["class"]) + [f"{c} (new)" for c in
                                                             comp.new_classes["class"]])
    ax.invert_yaxis(); ax.set_xlim(0, 1); ax.set_xlabel("benchmark accuracy")
    ax.set_title(f"shared classes: {comp.baseline} {comp.baseline_accuracy:.3f} -> "
                 f"{comp.candidate} {comp.candidate_accuracy:.3f}")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- promotion

@dataclass
class Decision:
    """The promotion rule's verdict and its reasons (`promoted`: deployed.json was written)."""

    promote: bool
    reasons: list[str]
    promoted: bool = False

    def __str__(self) -> str:
        verdict = "PROMOTE" if self.promote else "KEEP THE DEPLOYED GENERATION"
        return f"{verdict}: " + "; ".join(self.reasons)


def deployed_name(ws: Workspace) -> str | None:
    """The deployed generation's name, or None."""
    record = models.read_deployed(ws)
    return record["generation"] if record else None


def decide(comp: Comparison, min_gain: float = 0.0, max_class_drop: float = 0.05,
           min_class_images: int = 1) -> Decision:
    """The promotion rule on a comparison with the deployed generation.

    Promote when the benchmark accuracy on the shared classes gains at least
    `min_gain` and no shared class loses more than `max_class_drop` (both
    inclusive). A class with fewer than `min_class_images` benchmark images is
    left out of the drop check (one image of five is a 0.2 swing, noise rather
    than a regression) and named in the reasons. New classes do not enter the
    rule: the deployed model cannot predict them.
    """
    reasons, ok = [], True
    if comp.images == 0:
        return Decision(False, ["no benchmark image of a shared class: nothing to compare"])
    if comp.gain + _EPS >= min_gain:
        reasons.append(f"gain {comp.gain:+.3f} on shared classes meets MIN_GAIN {min_gain:+.3f}")
    else:
        ok = False
        reasons.append(f"gain {comp.gain:+.3f} on shared classes is below MIN_GAIN {min_gain:+.3f}")
    small = comp.per_class[comp.per_class["images"] < min_class_images]
    if len(small):
        reasons.append(f"{len(small)} class(es) with fewer than {min_class_images} benchmark "
                       f"images left out of the drop check: {', '.join(small['class'])}")
    judged = comp.per_class[comp.per_class["images"] >= min_class_images]
    drops = judged.assign(drop=-judged["change"]).sort_values("drop")
    worst = drops.iloc[-1] if len(drops) else None
    if worst is not None and worst["drop"] > max_class_drop + _EPS:
        ok = False
        bad = drops[drops["drop"] > max_class_drop + _EPS]
        reasons.append(f"{len(bad)} class(es) drop more than MAX_CLASS_DROP {max_class_drop:.3f}: "
                       + ", ".join(f"{r['class']} {-r['drop']:+.3f}" for _, r in bad.iterrows()))
    elif worst is not None:
        reasons.append(f"largest class drop {max(worst['drop'], 0):.3f} ({worst['class']}) is "
                       f"within MAX_CLASS_DROP {max_class_drop:.3f}")
    if comp.new:
        reasons.append(f"new classes (not in the rule): {', '.join(comp.new)}")
    return Decision(ok, reasons)


def judge(workspace, candidate: str = "last", comparison: Comparison | None = None,
          min_gain: float = 0.0, max_class_drop: float = 0.05, min_class_images: int = 1
          ) -> tuple[Decision, Comparison | None]:
    """What the promotion rule says about a candidate, without deploying anything.

    A throw-away candidate is never promoted; the first promotion (nothing deployed
    yet) needs no comparison; otherwise the candidate is compared with the deployed
    generation (`comparison` is reused when it is against that generation).

    Returns:
        The decision and the comparison it rests on (None without a deployed generation).
    """
    ws = open_workspace(workspace)
    name = models.resolve_generation(ws, candidate, include_throwaway=True)
    current = deployed_name(ws)
    if models.read_info(ws, name).get("throwaway"):
        return Decision(False, [f"{name} is a throw-away generation: never promoted"]), None
    if current == name:
        return Decision(False, [f"{name} is already the deployed generation"]), None
    if current is None:
        return Decision(True, ["nothing is deployed yet: the first generation is promoted"]), None
    if comparison is None or (comparison.candidate, comparison.baseline) != (name, current):
        comparison = compare(ws, name, current)
    return decide(comparison, min_gain, max_class_drop, min_class_images), comparison


def promote(workspace, candidate: str = "last", comparison: Comparison | None = None,
            min_gain: float = 0.0, max_class_drop: float = 0.05, force: bool = False,
            min_class_images: int = 1) -> Decision:
    """Apply the promotion rule and, if it says so (or `force`), deploy the candidate.

    Deploying writes `models/deployed.json` and a "promote" journal row.

    Args:
        workspace: a workspace path or Workspace.
        candidate: a generation name or "last".
        comparison: a comparison of the candidate with the deployed generation
            (computed when None or made against another generation).
        min_gain, max_class_drop: the rule's thresholds (see `decide`).
        force: deploy even if the rule says no (never a throw-away run).
        min_class_images: smallest benchmark class the drop check judges.

    Returns:
        The decision; `promoted` tells whether deployed.json was written.

    Raises:
        ZoolibError: the candidate is a throw-away generation or does not exist.
    """
    ws = open_workspace(workspace)
    name = models.resolve_generation(ws, candidate, include_throwaway=True)
    if models.read_info(ws, name).get("throwaway"):
        raise ZoolibError(f"{name} is a throw-away generation: it can never be promoted "
                          "(it exists only for bulk identification of rare classes)")
    current = deployed_name(ws)
    decision, comparison = judge(ws, name, comparison, min_gain, max_class_drop,
                                 min_class_images)
    if current == name or not (decision.promote or force):
        return decision
    forced = force and not decision.promote
    if forced:
        decision.reasons.append("promoted anyway: force=True")
    details = {"previous": current, "gain": comparison.gain if comparison else None,
               "forced": forced, "rule": {"min_gain": min_gain, "max_class_drop": max_class_drop,
                        "min_class_images": min_class_images},
               "reasons": decision.reasons}
    models.write_deployed(ws, name, **details)
    journal.record(ws, "promote", generation=name, **details)
    decision.promoted = True
    return decision


# --------------------------------------------------------------------------- lineage

def lineage(workspace) -> pd.DataFrame:
    """One row per generation: parent, classes added, head init, plateau, accuracies, flags."""
    ws = open_workspace(workspace)
    current = deployed_name(ws)
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
    return _save(fig, path)
