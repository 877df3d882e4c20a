"""Curation: find problems in the library (unreadable files, exact duplicates)."""
from __future__ import annotations

import pandas as pd


def unreadable(manifest: pd.DataFrame) -> pd.DataFrame:
    """Files that could not be decoded, with the reason.

    Returns:
        Columns path, label, bytes, error.
    """
    bad = manifest.loc[~manifest["readable"], ["path", "label", "bytes", "error"]]
    return bad.reset_index(drop=True)


def exact_duplicates(manifest: pd.DataFrame) -> pd.DataFrame:
    """Groups of readable files with identical content.

    Returns:
        One row per group: hash, count, paths (list), labels (sorted list) and
        conflict (True when copies are filed under different classes); largest
        groups first.
    """
    ok = manifest[manifest["readable"]]
    dup = ok[ok.duplicated("hash", keep=False)]
    groups = dup.groupby("hash").agg(count=("path", "size"), paths=("path", list),
                                     labels=("label", lambda s: sorted(set(s))))
    groups["conflict"] = groups["labels"].map(len) > 1
    return groups.reset_index().sort_values(["count", "hash"], ascending=[False, True],
                                            ignore_index=True)
