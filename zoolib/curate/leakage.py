"""Leakage: near duplicates that sit in different splits, and pinning them together.
"""
from __future__ import annotations



import numpy as np
import pandas as pd

from .. import library, splits
from ..workspace import UNKNOWN, Workspace
from .duplicates import components
from .edits import edit_table

_HELD_OUT = ["train", "valid", "test", "benchmark"]  # later = further from training


def current_splits(ws: Workspace, manifest: pd.DataFrame) -> pd.Series:
    """The split of every readable, non-discarded library image (index: path).

    Uses `splits.split_manifest` over all classes but Unknown, so it honours
    discard flags, pins and the frozen benchmark exactly as training does.
    """
    classes = sorted(set(manifest["label"]) - {UNKNOWN})
    data = splits.split_manifest(ws, manifest, classes)
    return data.set_index("path")["split"]


def leakage(ws: Workspace, manifest: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Duplicate and near-duplicate pairs that sit in different splits.

    Args:
        ws: the workspace.
        manifest: from `library.scan`.
        pairs: from `near_duplicate_pairs` and/or `embedding_pairs`.

    Returns:
        PAIR_COLUMNS plus split_a, split_b, train_leak (one side is trained on,
        the other evaluated) and suggested_pin (the more held-out split, test
        instead of the frozen benchmark); train leaks first.
    """
    split = current_splits(ws, manifest)
    out = pairs.assign(split_a=pairs["path_a"].map(split), split_b=pairs["path_b"].map(split))
    out = out.dropna(subset=["split_a", "split_b"])
    out = out[out["split_a"] != out["split_b"]].copy()
    out["train_leak"] = (out["split_a"] == "train") ^ (out["split_b"] == "train")
    rank = {s: k for k, s in enumerate(_HELD_OUT)}
    far = np.maximum(out["split_a"].map(rank), out["split_b"].map(rank))
    out["suggested_pin"] = [_pinnable(_HELD_OUT[int(k)]) for k in far]
    return out.sort_values(["train_leak", "path_a", "path_b"], ascending=[False, True, True],
                           ignore_index=True)


def _pinnable(split: str) -> str:
    return "test" if split == "benchmark" else split


def pin_leaking_groups(ws: Workspace, manifest: pd.DataFrame, pairs: pd.DataFrame) -> int | None:
    """Pin every duplicate group that spans splits to its most held-out split.

    The whole group (all images linked by `pairs`) is pinned, so no member is
    left behind in training; frozen benchmark members stay in the benchmark.

    Returns:
        The journal event id of the pin, or None when nothing leaks.
    """
    leaks = leakage(ws, manifest, pairs)
    if leaks.empty:
        return None
    split = current_splits(ws, manifest)
    pairs = pairs[pairs["path_a"].isin(split.index) & pairs["path_b"].isin(split.index)]
    paths = sorted(set(pairs["path_a"]) | set(pairs["path_b"]))
    comp = components(paths, pairs)
    rank = {s: k for k, s in enumerate(_HELD_OUT)}
    pins: dict[str, str] = {}
    for gid in set(comp.loc[list(leaks["path_a"])]):
        group = list(comp.index[comp == gid])
        target = _pinnable(max(split.loc[group], key=rank.get))
        pins.update({p: target for p in group if split.loc[p] != "benchmark"})
    return edit_table(ws, library.flags_csv(ws), library.FLAG_COLUMNS, "pin",
                       {p: {"pin": s} for p, s in pins.items()})
