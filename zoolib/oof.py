"""Out-of-fold predictions: each library image's class probabilities by a model that
did not see it, the input of every cleanlab estimate in `cleaning`.

Two ways, or both averaged (`predictions` picks by OOF_FROM):

- fold models (`out_of_fold`): k throw-away fold generations (the `FOLDS`/`FOLD`
  machinery of training: fold i of the train+valid pool is held out); every
  image of the training classes gets the probabilities of the fold model that
  held it out, and test and benchmark images, which no fold trains on, the mean
  of all fold models. Hours on a CPU for a real library.
- a linear probe on a pretrained EMBEDDER's vectors (`probe_oof`, `probe`):
  seconds once the vectors are cached.

The table is stored in the workspace (`cleaning/oof.parquet`), so the other calls
and a later kernel reuse it; `attrs["predicted_by"]` says what made it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import inference, probe
from .embedder import HOW_TO, MODEL
from .evaluate import predict_rows
from .train import TrainConfig, train
from .workspace import Workspace, ZoolibError, open_workspace, write_atomic

OOF_FILE = "oof.parquet"
SOURCES = ("auto", "folds", "probe", "both")
# a combined table keeps each source's own probabilities beside their mean, for the
# consensus of `cleaning.label_issues`
PART_COLUMNS = ("probs_a", "probs_b")


def folder(ws: Workspace) -> Path:
    """`WORKSPACE/cleaning/`: derived tables of the cleaning step (rebuilt by re-running)."""
    return ws.cleaning


def out_of_fold(workspace, cfg: TrainConfig, folds: int = 4, tta: bool = False,
                progress: bool = True) -> pd.DataFrame:
    """Train `folds` throw-away generations and predict each image with a model that
    did not train on it.

    Args:
        workspace: the workspace.
        cfg: the fold runs' settings: the budget (EPOCHS, PATIENCE) and the start
            (INIT_FROM: "last" warm-starts every fold from the newest generation,
            cheaper; "scratch" never saw any image). FOLDS, FOLD and THROWAWAY
            are set here.
        folds: k, at least 2.
        tta: multi-crop test-time augmentation (`inference.tta_views`, six passes).
        progress: progress bars of training and prediction.

    Returns:
        One row per image of the training classes: path, hash, label, split
        ("train"/"valid" pool, or "test"/"benchmark"), fold (-1 for test and
        benchmark images), generation (the model that predicted it, or "mean"),
        probs (an array over `attrs["classes"]`), pred, confidence. Also saved
        as `cleaning/oof.parquet`.

    Raises:
        ZoolibError: fewer than 2 folds, or the fold runs disagree on the classes.
    """
    ws = open_workspace(workspace)
    if int(folds) < 2:
        raise ZoolibError(f"FOLDS must be at least 2 for out-of-fold predictions, got {folds}")
    parts, held, classes, names = [], [], None, []
    for fold in tqdm(range(int(folds)), desc="fold models", disable=not progress):
        result = train(ws, replace(cfg, folds=int(folds), fold=fold, throwaway=True),
                       progress=progress)
        names.append(result.name)
        loaded = inference.load(ws, result.name)
        if classes is not None and loaded.classes != classes:
            raise ZoolibError(f"fold {fold} trained on classes {loaded.classes}, fold 0 on "
                              f"{classes}: the library changed during the run; run it again")
        classes = loaded.classes
        rows = result.splits
        valid = rows[rows["split"] == "valid"]
        parts.append(_predicted(ws, loaded, valid, tta).assign(fold=fold, split="pool",
                                                               generation=result.name))
        held.append(_predicted(ws, loaded, rows[rows["split"].isin(["test", "benchmark"])], tta))
    table = pd.concat(parts + [_mean_of(held)], ignore_index=True)
    table.attrs.update(classes=classes, generations=names, folds=int(folds),
                       init=cfg.init_from, predicted_by=f"{folds} fold models ({cfg.init_from})")
    save_oof(ws, table)
    # pred and confidence of every row from its probabilities: the held-out test and
    # benchmark rows are a mean of the fold models and had neither
    return _with_prediction(table, table.attrs.pop("classes"), **table.attrs)


def probe_oof(workspace, value: str, generation: str | None = "last", folds: int = probe.FOLDS,
              progress: bool = True) -> pd.DataFrame:
    """Out-of-fold predictions by a linear probe on EMBEDDER `value` (`probe.out_of_fold`):
    seconds instead of k training runs. Saved as `cleaning/oof.parquet` like fold models'."""
    ws = open_workspace(workspace)
    table = probe.out_of_fold(ws, value, generation, folds, progress=progress)
    save_oof(ws, table)
    return _with_prediction(table, table.attrs.pop("classes"), **table.attrs)


def combine_oof(workspace, first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """The images both tables predict, with the mean of their probabilities (fold models
    and the probe err differently, so their average ranks label issues better than
    either; bench/label_issues.py measures it). Saved as `cleaning/oof.parquet`.

    Raises:
        ZoolibError: the tables' class lists differ.
    """
    ws = open_workspace(workspace)
    if list(first.attrs["classes"]) != list(second.attrs["classes"]):
        raise ZoolibError(f"cannot combine predictions over {first.attrs['classes']} with "
                          f"predictions over {second.attrs['classes']}")
    both = first.drop(columns=list(PART_COLUMNS), errors="ignore").merge(
        second[["path", "probs"]], on="path", suffixes=("", "_2"))
    both["probs_a"], both["probs_b"] = both["probs"], both.pop("probs_2")
    both["probs"] = [(a + b) / 2 for a, b in zip(both["probs_a"], both["probs_b"])]
    attrs = {"generations": first.attrs.get("generations", []) + second.attrs.get(
        "generations", []), "folds": first.attrs.get("folds", 0), "init": "combined",
        "predicted_by": f"{first.attrs.get('predicted_by')} + {second.attrs.get('predicted_by')}"}
    both.attrs.update(classes=first.attrs["classes"], **attrs)
    save_oof(ws, both)
    return _with_prediction(both, first.attrs["classes"], **attrs)


def _predicted(ws: Workspace, loaded: inference.Loaded, rows: pd.DataFrame, tta: bool
               ) -> pd.DataFrame:
    """Prediction frame of split rows (hash, path, label, split) by one fold model."""
    rows = rows.drop_duplicates("path").reset_index(drop=True)
    frame = predict_rows(ws, loaded.name, rows, loaded=loaded, tta=tta)
    return frame.assign(hash=rows["hash"].to_numpy(), split=rows["split"].to_numpy())


def _mean_of(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Test and benchmark rows: every fold model held them out, so average them all."""
    first = frames[0].set_index("path")
    probs = np.mean([np.stack(f.set_index("path").loc[first.index, "probs"]) for f in frames],
                    axis=0)
    out = first.reset_index()[["path", "hash", "label", "split"]]
    out["probs"] = list(probs)
    return out.assign(fold=-1, generation="mean")


def save_oof(ws: Workspace, table: pd.DataFrame) -> Path:
    """Write the out-of-fold table (probabilities as lists, classes in the metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    classes = table.attrs["classes"]
    out = table[["path", "hash", "label", "split", "fold", "generation"]].copy()
    for column in ("probs", *[c for c in PART_COLUMNS if c in table]):
        out[column] = [np.asarray(p, dtype=np.float32).tolist() for p in table[column]]
    meta = {"classes": "\x1f".join(classes),
            "generations": "\x1f".join(table.attrs.get("generations", [])),
            "folds": str(table.attrs.get("folds", "")), "init": table.attrs.get("init", ""),
            "predicted_by": table.attrs.get("predicted_by", "")}
    arrow = pa.Table.from_pandas(out, preserve_index=False).replace_schema_metadata(meta)
    path = folder(ws) / OOF_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, write=lambda p: pq.write_table(arrow, p))


def load_oof(workspace) -> pd.DataFrame:
    """The stored out-of-fold table (see `out_of_fold`), with pred and confidence.

    Raises:
        ZoolibError: none stored yet, or the file is not readable.
    """
    import pyarrow.parquet as pq

    ws = open_workspace(workspace)
    path = folder(ws) / OOF_FILE
    if not path.exists():
        raise ZoolibError(f"no out-of-fold predictions in {path}: run cleaning.out_of_fold "
                          "(06_clean) first")
    try:
        arrow = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any parquet failure means "re-run it"
        raise ZoolibError(f"{path} is not readable ({exc}): delete it and run "
                          "cleaning.out_of_fold again") from exc
    meta = {k.decode(): v.decode() for k, v in (arrow.schema.metadata or {}).items()}
    table = arrow.to_pandas()
    for column in ("probs", *[c for c in PART_COLUMNS if c in table]):
        table[column] = [np.asarray(p, dtype=np.float64) for p in table[column]]
    return _with_prediction(table, meta["classes"].split("\x1f"),
                            generations=meta["generations"].split("\x1f"),
                            folds=int(meta["folds"] or 0), init=meta.get("init", ""),
                            predicted_by=meta.get("predicted_by", ""))


def _with_prediction(table: pd.DataFrame, classes: list[str], **attrs) -> pd.DataFrame:
    probs = np.stack(table["probs"]) if len(table) else np.zeros((0, len(classes)))
    table["pred"] = [classes[i] for i in probs.argmax(axis=1)]
    table["confidence"] = probs.max(axis=1) if len(table) else []
    table.attrs.update(classes=classes, **attrs)
    return table


def predictions(workspace, cfg: TrainConfig, source: str = "auto", embedder: str = MODEL,
                folds: int = 4, tta: bool = False, progress: bool = True) -> pd.DataFrame:
    """Out-of-fold predictions by OOF_FROM `source`.

    Args:
        workspace: the workspace.
        cfg: the fold models' settings (`out_of_fold`).
        source: "folds" (fold models), "probe" (a linear probe on `embedder`),
            "both" (their mean, `combine_oof`) or "auto": "probe" when a pretrained
            embedder is configured, else "folds".
        embedder: the EMBEDDER (`embedder.choose`).
        folds: k, for the fold models or the probe.
        tta: the fold models' test-time augmentation.
        progress: progress bars.

    Raises:
        ZoolibError: an unknown source, or "probe"/"both" without a pretrained embedder.
    """
    if source not in SOURCES:
        raise ZoolibError(f"OOF_FROM must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "auto":
        source = "folds" if embedder == MODEL else "probe"
    if source != "folds" and embedder == MODEL:
        raise ZoolibError(f"OOF_FROM={source!r} needs a pretrained EMBEDDER; " + HOW_TO)
    if source == "probe":
        return probe_oof(workspace, embedder, folds=max(2, folds), progress=progress)
    models_ = out_of_fold(workspace, cfg, folds=folds, tta=tta, progress=progress)
    if source == "folds":
        return models_
    probed = probe.out_of_fold(open_workspace(workspace), embedder, folds=max(2, folds),
                               progress=progress)
    return combine_oof(workspace, models_, probed)
