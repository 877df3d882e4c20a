"""Replicate the practitioner's results on CIFAR-10 animals over a growing library (issue 13).

The whole workflow, with the workbench's own functions and default recipe, on the
six animal classes of `../shared/datasets/cifar10` (bird cat deer dog frog horse):

1. Generation 1 from scratch on five classes (the held-out one is missing).
2. Bulk identification of an inbox of unseen cifar10/train images of all six
   animals plus vehicles (airplane automobile ship truck) as junk, measuring
   (a) look-alike discovery: among images predicted below `--threshold` confidence
       as the held-out class's look-alike (the class generation 1 most often gives
       the held-out class's labelled library images), the share that truly is the
       held-out class, over its share of the inbox (the enrichment factor);
   (b) mass removal: ROC AUC of each score at separating junk from animals, the
       default of `bulkid.lowest_scores` among them.
3. Generations 2 and 3 as the library grows: generation 2 adds images to every
   class and the held-out class arrives; generation 3 adds more to all six. At each,
   the warm chain (warm-started from the previous warm generation) and a run from
   scratch train on the same splits under the same budget.
4. Test figures of every model on `cifar10/test` (its classes), used for nothing else.

How the data are subsampled (the defaults are sized so that the five trainings
fit 90 minutes on 2 CPU cores, which train zoo_cnn at about 260 images/s at 32 px;
the workspace keeps the default 70/10/10/10 split): each class's cifar10/train
files are shuffled with the seed; generation g's library holds the first `--sizes[g]` of
them (so a generation keeps every image of the one before), the held-out class
arrives at generation 2 with `--new-class` images; the inbox takes the last
`--inbox-per-class` of every class, never in the library. Splits are by content
hash, so an image keeps its split in every generation and both runs of a
generation see the same splits. Images are hard-linked (copied across file systems); the inbox gets
opaque shuffled names and its answer key lives beside the workspace.

    python bench/replicate.py --quick                       # smoke run, a few minutes
    nohup nice python bench/replicate.py > /tmp/replicate.log 2>&1 &   # default run
    python bench/replicate.py --arch inception_v4 --size 299 --batch-size 64 \\
        --sizes 2000,3000,4000 --run inception-gpu             # on a GPU

Output: `reports/replicate/<run>/` with summary.md, metrics.json (a `goals`
object: value, goal and met for each), CSV tables and PNGs.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from cifar import (ANIMALS, DATA, REPO, VEHICLES, EpochLog,  # noqa: E402
                   link_inbox, link_library, peak_rss_mb, test_rows)
from zoolib import bulkid, evaluate, metrics, pipeline, workspace  # noqa: E402
from zoolib.train import TrainConfig, train  # noqa: E402
from zoolib.workspace import ZoolibError  # noqa: E402

THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01]  # 1.01: every look-alike prediction
GOALS = {"epoch_ratio": 0.25, "test_gain": 0.01, "enrichment": 3.0, "junk_auc": 0.85,
         "peak_rss_mb": 2048, "rss_growth_mb": 64, "minutes": 90}

DEFAULTS = dict(holdout="cat", arch="zoo_cnn", size=32, sizes="1000,1500,2000", new_class=750,
                inbox_per_class=500, test_per_class=0, epochs=40, batch_size=None, lr=None,
                lr_warm=None, patience=None, threshold=0.7, seed=0)
QUICK = dict(sizes="60,80,100", new_class=50, inbox_per_class=20, test_per_class=40, epochs=3,
             batch_size=32)


# ----------------------------------------------------------------------------- data

def sample_files(data: Path, sizes: list[int], inbox_per_class: int, seed: int
                 ) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Each animal class's library order and every class's inbox (disjoint, seeded).

    Returns:
        (the first max(sizes) shuffled files per animal class, inbox files per class).

    Raises:
        ZoolibError: the data folder or a class folder is missing, or holds too few images.
    """
    library, inbox = {}, {}
    for cls in ANIMALS + VEHICLES:
        folder = data / "train" / cls
        files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
        need = inbox_per_class + (max(sizes) if cls in ANIMALS else 0)
        if len(files) < need:
            raise ZoolibError(f"{folder} holds {len(files)} images, {need} needed "
                              "(--sizes + --inbox-per-class); is --data right?")
        random.Random(f"{seed}-{cls}").shuffle(files)
        if cls in ANIMALS:
            library[cls] = files[:max(sizes)]
        inbox[cls] = files[len(files) - inbox_per_class:]  # the far end: never in the library
    return library, inbox


def library_counts(gen: int, args) -> dict[str, int]:
    """Images per class in generation `gen`'s library (1-based)."""
    counts = {cls: args.sizes[gen - 1] for cls in ANIMALS}
    if gen == 1:
        del counts[args.holdout]
    elif gen == 2:
        counts[args.holdout] = args.new_class
    return counts


def grow_library(ws, files: dict[str, list[Path]], counts: dict[str, int]) -> None:
    """Link the first `counts[cls]` files of each class (the links already there stay)."""
    for cls, n in counts.items():
        link_library(ws, cls, files[cls][:n])


# ----------------------------------------------------------------------------- training

def config(args, init_from: str) -> TrainConfig:
    """TrainConfig defaults, with the flags the run was given."""
    given = {k: getattr(args, k) for k in ("batch_size", "lr", "lr_warm", "patience")
             if getattr(args, k) is not None}
    return TrainConfig(arch=args.arch, img_size=args.size, epochs=args.epochs,
                       min_images=min(40, min(args.sizes + [args.new_class])),
                       init_from=init_from, seed=args.seed, resume=False,
                       num_workers=args.workers, validate="every",  # epochs-to-reach needs each
                       **given)


def train_generation(ws, args, init_from: str, label: str) -> tuple:
    """One generation through `zoolib.train.train`; returns its TrainResult and RSS per epoch."""
    log = EpochLog(label)
    cfg = config(args, init_from)
    print(f"[{label}] training {cfg.arch} {cfg.img_size}px, budget {cfg.epochs} epochs, "
          f"init {init_from}", flush=True)
    return train(ws, cfg, progress=False, extra_cbs=[log]), log.rss


def lookalike_of(ws, generation: str, holdout: str) -> tuple[str, dict[str, int]]:
    """The class `generation` most often gives the held-out class's library images.

    These are labelled library images (generation 2's training data), not inbox or
    test images, so choosing the look-alike uses no answer key the practitioner lacks.
    """
    rows = pd.DataFrame({"path": sorted(p.relative_to(ws.library).as_posix()
                                        for p in (ws.library / holdout).iterdir()),
                         "label": holdout})
    frame = evaluate.predict_rows(ws, generation, rows)
    counts = frame["pred"].value_counts()
    return str(counts.index[0]), {str(k): int(v) for k, v in counts.items()}


# ----------------------------------------------------------------------------- measures

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


def first_reach(acc: pd.Series, target: float) -> int | None:
    """The first 1-based epoch whose accuracy is at least `target` (None if never)."""
    hits = np.flatnonzero(acc.to_numpy() >= target - 1e-12)
    return int(hits[0]) + 1 if len(hits) else None


def warm_vs_scratch(warm, scratch) -> dict:
    """Compare the two runs of a generation (TrainResults: history and model.json).

    `ratio` = (first warm epoch reaching the scratch run's best valid accuracy) /
    (the scratch run's epoch of that best); `ratio_vs_epochs` divides by all the
    epochs the scratch run took. Plateau epochs are the schedule's (see
    zoolib/schedule.py); final valid accuracies are those of the kept epochs.
    """
    s_hist, w_hist = scratch.history, warm.history
    s_best = float(s_hist["accuracy"].max())
    s_best_epoch = int(s_hist["accuracy"].idxmax()) + 1
    reach = first_reach(w_hist["accuracy"], s_best)
    sm, wm = scratch.info["metrics"], warm.info["metrics"]
    return {
        "scratch_best_accuracy": s_best, "scratch_best_epoch": s_best_epoch,
        "scratch_epochs": int(sm["epochs_run"]), "warm_epochs": int(wm["epochs_run"]),
        "scratch_plateau_epoch": sm["plateau_epoch"], "warm_plateau_epoch": wm["plateau_epoch"],
        "warm_best_accuracy": float(w_hist["accuracy"].max()),
        "warm_epochs_to_scratch_best": reach,
        "ratio": reach / s_best_epoch if reach else None,
        "ratio_vs_epochs": reach / sm["epochs_run"] if reach else None,
        "warm_final_valid": float(wm["valid_accuracy"]),
        "scratch_final_valid": float(sm["valid_accuracy"]),
    }


def test_figures(ws, generation: str, rows: pd.DataFrame, classes: list[str]) -> dict:
    """Accuracy (plain and with flip TTA) and per-class figures on the test rows."""
    rows = rows[rows["label"].isin(classes)].reset_index(drop=True)
    frame = evaluate.predict_rows(ws, generation, rows)
    tta = evaluate.predict_rows(ws, generation, rows, tta=True)
    summary = metrics.summarize(frame, classes)
    return {"images": int(len(rows)), "accuracy": summary["accuracy"],
            "accuracy_tta": float((tta["pred"] == tta["label"]).mean()),
            "macro_f1": summary["macro_f1"], "ece": summary["ece"],
            "per_class": summary["per_class"],
            "top_confusions": metrics.top_confusions(frame, classes, 3).to_dict(orient="records"),
            "confusion": metrics.confusion(frame, classes)}


def rss_growth(per_epoch: list[float]) -> float:
    """Resident memory added over a run after its first epoch (MB; 0 for one epoch)."""
    return max(0.0, per_epoch[-1] - per_epoch[0]) if len(per_epoch) > 1 else 0.0


# ----------------------------------------------------------------------------- figures

def plot_curves(runs: dict, cmps: dict, path: Path) -> None:
    """Valid accuracy per epoch, warm versus scratch, for every generation after the first."""
    gens = sorted(cmps)
    fig, axes = plt.subplots(1, len(gens), figsize=(6 * len(gens), 4), squeeze=False)
    for ax, g in zip(axes[0], gens):
        warm, scratch, cmp = runs[g]["warm"].history, runs[g]["scratch"].history, cmps[g]
        ax.plot(warm["epoch"], warm["accuracy"], "o-", label=f"gen {g} warm start")
        ax.plot(scratch["epoch"], scratch["accuracy"], "s-", label=f"gen {g} from scratch")
        ax.axhline(cmp["scratch_best_accuracy"], color="gray", ls=":", label="scratch best")
        if cmp["warm_epochs_to_scratch_best"]:
            ax.axvline(cmp["warm_epochs_to_scratch_best"], color="tab:blue", ls="--", lw=0.8,
                       label=f"warm reaches it (epoch {cmp['warm_epochs_to_scratch_best']})")
        ax.set_xlabel("epoch"); ax.set_ylabel("valid accuracy"); ax.legend(loc="lower right")
        ax.set_title(f"Generation {g}: same splits, same budget")
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def plot_inbox(table: pd.DataFrame, results: pd.DataFrame, truth: pd.DataFrame,
               scores: pd.DataFrame, holdout: str, lookalike: str, path: Path) -> None:
    """Enrichment per threshold and the junk-removal ROC curve of every score."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(table["threshold"].clip(upper=1.0), table["enrichment"], "o-")
    ax1.axhline(GOALS["enrichment"], color="tab:red", ls="--", label="goal 3x")
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


# ----------------------------------------------------------------------------- report

def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def goals(m: dict) -> dict:
    """Each headline goal: name -> value, goal and met (the issue's, at the last generation)."""
    last = str(max(int(g) for g in m["generations"]))
    c, t = m["warm_vs_scratch"][last], m["test"][last]
    gain = t["warm"]["accuracy"] - t["scratch"]["accuracy"]
    default = next(r for r in m["junk_scores"] if r["default"])
    return {
        "epoch_ratio": {"value": c["ratio"], "goal": GOALS["epoch_ratio"],
                        "met": c["ratio"] is not None and c["ratio"] <= GOALS["epoch_ratio"],
                        "what": f"gen {last}: warm epochs to the scratch run's best valid "
                                "accuracy / the scratch run's epoch of it, at most"},
        "test_gain": {"value": round(gain, 4), "goal": GOALS["test_gain"],
                      "met": gain >= GOALS["test_gain"],
                      "what": f"gen {last}: warm minus scratch cifar10/test accuracy, at least"},
        "enrichment": {"value": m["lookalike"]["enrichment"], "goal": GOALS["enrichment"],
                       "met": bool(m["lookalike"]["enrichment"] >= GOALS["enrichment"]),
                       "what": "gen 1 look-alike enrichment, at least"},
        "junk_auc": {"value": default["auc"], "goal": GOALS["junk_auc"],
                     "met": bool(default["auc"] >= GOALS["junk_auc"]),
                     "what": f"gen 1 junk-removal ROC AUC of the default score "
                             f"({default['score']}), at least"},
        "peak_rss_mb": {"value": m["memory"]["peak_rss_mb"], "goal": GOALS["peak_rss_mb"],
                        "met": m["memory"]["peak_rss_mb"] < GOALS["peak_rss_mb"],
                        "what": "peak resident memory of the run (MB), under"},
        "rss_growth_mb": {"value": m["memory"]["max_growth_mb"], "goal": GOALS["rss_growth_mb"],
                          "met": m["memory"]["max_growth_mb"] <= GOALS["rss_growth_mb"],
                          "what": "resident memory added within a training run after its "
                                  "first epoch (MB), at most"},
        "minutes": {"value": round(m["seconds"]["total"] / 60, 1), "goal": GOALS["minutes"],
                    "met": m["seconds"]["total"] / 60 <= GOALS["minutes"],
                    "what": "total run time (minutes, 2 CPU cores), at most"},
    }


def _table(df: pd.DataFrame) -> str:
    """A DataFrame as a markdown table (no tabulate dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, ".3f") if isinstance(v, float) else str(v)
                                       for v in row) + " |")
    return "\n".join(lines)


def generation_table(m: dict) -> pd.DataFrame:
    """One row per generation and run: epochs, plateau, valid and test accuracy."""
    rows = []
    for g, runs in m["runs"].items():
        for kind, r in runs.items():
            t = m["test"][g][kind]
            c = m["warm_vs_scratch"].get(g, {})
            rows.append({"gen": g, "run": kind, "classes": r["n_classes"],
                         "train images": r["train_images"], "epochs": r["epochs_run"],
                         "plateau epoch": r["plateau_epoch"], "kept epoch": r["best_epoch"],
                         "to scratch best": c.get("warm_epochs_to_scratch_best", "")
                         if kind == "warm" else c.get("scratch_best_epoch", ""),
                         "valid acc": r["valid_accuracy"], "test acc": t["accuracy"],
                         "test acc (TTA)": t["accuracy_tta"], "minutes": r["train_seconds"] / 60})
    return pd.DataFrame(rows)


def summary_markdown(m: dict, enrich: pd.DataFrame, scores: pd.DataFrame) -> str:
    """The run's summary.md."""
    s, look = m["settings"], m["lookalike"]
    g = pd.DataFrame([{"goal": k, "what": v["what"], "value": v["value"], "target": v["goal"],
                       "met": v["met"]} for k, v in m["goals"].items()])
    return "\n".join([
        f"# Replication on CIFAR-10 animals: run `{m['run']}`", "",
        f"{s['arch']} at {s['size']} px from random weights, the workbench's default recipe; "
        f"held-out class **{s['holdout']}**. Library per class by generation: "
        f"{m['library_counts']} (the first images of a seeded shuffle of cifar10/train; splits "
        f"by content hash, ~70% train and 10% valid); an inbox of {s['inbox_per_class']} other "
        f"cifar10/train images per class (six animals + four vehicles as junk, "
        f"{m['inbox']['images']} files); cifar10/test for the test figures only. Budget "
        f"{s['epochs']} epochs per run. Total {m['seconds']['total'] / 60:.1f} min, peak "
        f"resident memory {m['memory']['peak_rss_mb']:.0f} MB.", "",
        "## Goals", "", _table(g), "",
        "## Generations", "", _table(generation_table(m)), "",
        "![curves](curves.png)", "",
        "## Bulk identification of the inbox with generation 1", "",
        f"Look-alike of {s['holdout']}: **{look['class']}** (generation 1's predictions for "
        f"the {s['holdout']} library images: {look['counts']}).", "",
        f"At confidence below {s['threshold']}: {look['candidates']} candidates, "
        f"{look['holdout_found']} of them {s['holdout']} (share {_fmt(look['share'])} versus "
        f"{_fmt(look['base_share'])} in the inbox): enrichment "
        f"**{_fmt(look['enrichment'], '.2f')}x**, recall {_fmt(look['recall'])}.", "",
        _table(enrich), "",
        "Mass removal (junk = vehicles; `junk_in_bottom`: share of junk among the n_junk "
        "rows `lowest_scores` lists first by that score):", "", _table(scores), "",
        "![inbox](inbox.png)", "",
    ])


# ----------------------------------------------------------------------------- the run

def _run_record(result) -> dict:
    m = result.info["metrics"]
    return {"name": result.name, "n_classes": len(result.info["classes"]),
            "train_images": int(result.info["split_counts"].get("train", 0)),
            **{k: m[k] for k in ("plateau_epoch", "anneal_start", "best_epoch", "epochs_run",
                                 "valid_accuracy", "train_seconds", "train_images_per_s")},
            "history": result.history.to_dict(orient="list")}


def run(args) -> dict:
    """The whole replication; writes the report folder and returns its metrics."""
    t0 = time.perf_counter()
    if args.holdout not in ANIMALS:
        raise ZoolibError(f"--holdout must be one of {', '.join(ANIMALS)}, got {args.holdout!r}")
    out = pipeline.report_dir(Path(args.out) / args.run)
    ws_root = Path(args.workspace) if args.workspace else out / "workspace"
    if ws_root.exists() and any(ws_root.iterdir()):
        raise ZoolibError(f"workspace {ws_root} is not empty: choose another --run or --workspace")
    data = Path(args.data)
    files, inbox_files = sample_files(data, args.sizes + [args.new_class], args.inbox_per_class,
                                      args.seed)
    tests = test_rows(data, args.test_per_class)
    ws = workspace.create(ws_root)
    truth = link_inbox(ws, inbox_files, args.seed)
    truth.to_csv(out / "inbox_truth.csv", index=False)
    seconds, runs, rss, counts = {}, {}, {}, {}

    # 1. generation 1 from scratch on five classes, and its bulk identification
    counts["1"] = library_counts(1, args)
    grow_library(ws, files, counts["1"])
    g1, rss["gen1"] = train_generation(ws, args, "scratch", "gen1")
    runs["1"] = {"scratch": g1}
    t = time.perf_counter()
    results = bulkid.run(ws, g1.name, batch_size=256, num_workers=args.workers, progress=False)
    seconds["bulkid"] = round(time.perf_counter() - t, 1)

    # 2. the held-out class is labelled into the library: look-alike discovery measured
    counts["2"] = library_counts(2, args)
    grow_library(ws, files, counts["2"])
    look, look_counts = lookalike_of(ws, g1.name, args.holdout)
    enrich = pd.DataFrame([enrichment(results, truth, args.holdout, look, th)
                           for th in sorted(set(THRESHOLDS + [args.threshold]))])
    chosen = enrichment(results, truth, args.holdout, look, args.threshold)
    scores = junk_scores(results, truth)
    plot_inbox(enrich, results, truth, scores, args.holdout, look, out / "inbox.png")
    del results

    # 3. generations 2 and 3: the warm chain and a scratch run on the same splits
    cmps, parent = {}, g1.name
    for gen in (2, 3):
        if gen == 3:
            counts["3"] = library_counts(3, args)
            grow_library(ws, files, counts["3"])
        warm, rss[f"gen{gen}-warm"] = train_generation(ws, args, parent, f"gen{gen}-warm")
        scratch, rss[f"gen{gen}-scratch"] = train_generation(ws, args, "scratch",
                                                             f"gen{gen}-scratch")
        if warm.info["data_hash"] != scratch.info["data_hash"]:
            raise ZoolibError(f"the two generation-{gen} runs saw different splits")
        runs[str(gen)] = {"warm": warm, "scratch": scratch}
        cmps[str(gen)] = warm_vs_scratch(warm, scratch)
        parent = warm.name
    plot_curves({int(g): r for g, r in runs.items()}, {int(g): c for g, c in cmps.items()},
                out / "curves.png")

    # 4. final figures on cifar10/test
    t = time.perf_counter()
    test = {g: {k: test_figures(ws, r.name, tests, r.info["classes"]) for k, r in rr.items()}
            for g, rr in runs.items()}
    seconds["test"] = round(time.perf_counter() - t, 1)
    for g, rr in test.items():
        for k, v in rr.items():
            v.pop("confusion").to_csv(out / f"confusion_test_gen{g}_{k}.csv")
    test["1"]["warm"] = test["1"]["scratch"]  # generation 1 is the warm chain's root
    seconds["total"] = round(time.perf_counter() - t0, 1)

    report = {
        "run": args.run, "settings": vars(args), "seconds": seconds,
        "generations": list(runs), "library_counts": counts,
        "runs": {g: {k: _run_record(r) for k, r in rr.items()} for g, rr in runs.items()},
        "inbox": {"images": int(len(truth)), "per_class": truth["label"].value_counts()
                  .sort_index().to_dict()},
        "lookalike": {"class": look, "counts": look_counts, **chosen},
        "junk_scores": scores.to_dict(orient="records"),
        "warm_vs_scratch": cmps, "test": test,
        "memory": {"peak_rss_mb": round(peak_rss_mb()), "rss_per_epoch_mb": rss,
                   "max_growth_mb": round(max(rss_growth(v) for v in rss.values()), 1)},
    }
    report["runs"]["1"]["warm"] = report["runs"]["1"]["scratch"]
    report["goals"] = goals(report)
    enrich.to_csv(out / "enrichment.csv", index=False)
    scores.to_csv(out / "junk_scores.csv", index=False)
    generation_table(report).to_csv(out / "generations.csv", index=False)
    pipeline.write_metrics(out, report)
    (out / "summary.md").write_text(summary_markdown(report, enrich, scores))
    print(f"report: {out / 'summary.md'}", flush=True)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; --quick swaps in tiny smoke-test settings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = DEFAULTS
    ap.add_argument("--holdout", default=d["holdout"], help="animal class missing from gen 1")
    ap.add_argument("--arch", default=d["arch"], help="timm architecture")
    ap.add_argument("--size", type=int, default=d["size"], help="input size in pixels")
    ap.add_argument("--sizes", default=d["sizes"],
                    help="library images per class at generations 1,2,3 (comma-separated)")
    ap.add_argument("--new-class", type=int, default=d["new_class"],
                    help="images of the held-out class when it arrives at generation 2")
    ap.add_argument("--inbox-per-class", type=int, default=d["inbox_per_class"],
                    help="other cifar10/train images per class (10 classes) in the inbox")
    ap.add_argument("--test-per-class", type=int, default=d["test_per_class"],
                    help="cifar10/test images per animal class (0 = all 1000)")
    ap.add_argument("--epochs", type=int, default=d["epochs"], help="budget of every run")
    ap.add_argument("--lr", type=float, default=d["lr"], help="scratch peak lr (default: TrainConfig's)")
    ap.add_argument("--lr-warm", type=float, default=d["lr_warm"],
                    help="warm-start head peak lr (default: TrainConfig's)")
    ap.add_argument("--batch-size", type=int, default=d["batch_size"])
    ap.add_argument("--patience", type=int, default=d["patience"],
                    help="plateau test (default: TrainConfig's)")
    ap.add_argument("--threshold", type=float, default=d["threshold"],
                    help="look-alike candidates: confidence below this")
    ap.add_argument("--seed", type=int, default=d["seed"])
    ap.add_argument("--workers", type=int, default=None,
                    help="data-loading processes for training and bulkid (default: theirs)")
    ap.add_argument("--data", default=str(DATA), help="the cifar10 folder (train/ and test/)")
    ap.add_argument("--out", default=str(REPO / "reports" / "replicate"))
    ap.add_argument("--run", default=None, help="report folder name (default: a timestamp)")
    ap.add_argument("--workspace", default=None, help="default: <out>/<run>/workspace")
    ap.add_argument("--quick", action="store_true", help="tiny smoke settings")
    args = ap.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None
                                                            else sys.argv[1:])}
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    args.sizes = [int(v) for v in str(args.sizes).split(",")]
    if len(args.sizes) != 3 or any(v < 1 for v in args.sizes):
        raise SystemExit(f"--sizes needs three positive counts, got {args.sizes}")
    args.run = args.run or time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except ZoolibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, g in report["goals"].items():
        print(f"{'MET ' if g['met'] else 'MISS'} {name}: {g['value']} (goal {g['goal']}; "
              f"{g['what']})")
    print(json.dumps(report["seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
