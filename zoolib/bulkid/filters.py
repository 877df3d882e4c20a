"""Filters over a results table: plain pandas functions, each returning a subset with
the same columns, so they combine by nesting calls (the widget is a thin layer over them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..library import class_counts
from ..workspace import UNKNOWN, ZoolibError


# ----------------------------------------------------------------------------- filters

def _generations(results: pd.DataFrame) -> list[str]:
    return sorted(set(results["generation"].dropna()))


def check_generation(results: pd.DataFrame, generation: str) -> pd.DataFrame:
    """Return `results` unchanged if every row comes from `generation`.

    Raises:
        ZoolibError: the table (or part of it) comes from another generation.
    """
    other = [g for g in _generations(results) if g != generation]
    if other:
        raise ZoolibError(f"this results table comes from {', '.join(other)}, not "
                          f"{generation}: run bulk identification with {generation} first")
    if results.attrs.get("generation") not in (None, generation):
        raise ZoolibError(f"this results table comes from {results.attrs['generation']}, "
                          f"not {generation}")
    return results


def _class_table(results: pd.DataFrame, generation: str | None) -> pd.DataFrame:
    """Check a table is from one generation (the given one, if any); return it."""
    gens = _generations(results)
    if len(gens) > 1:
        raise ZoolibError(f"this results table mixes generations {', '.join(gens)}: "
                          "filter one generation's table at a time")
    return check_generation(results, generation) if generation else results


def _ok(results: pd.DataFrame) -> pd.DataFrame:
    return results[results["error"].fillna("") == ""]


def _by_confidence(rows: pd.DataFrame, ascending: bool) -> pd.DataFrame:
    return rows.sort_values(["confidence", "rel"], ascending=[ascending, True], kind="stable")


def errors(results: pd.DataFrame) -> pd.DataFrame:
    """Rows of files that could not be read (not images, truncated, bombs), by path."""
    return results[results["error"].fillna("") != ""].sort_values("rel", kind="stable")


def low_count_classes(results: pd.DataFrame, manifest: pd.DataFrame, max_count: int,
                      generation: str | None = None) -> pd.DataFrame:
    """Rows predicted as classes with at most `max_count` readable library images.

    Sorted by confidence, highest first: the likeliest new images for rare classes.

    Args:
        results: a results table.
        manifest: the library manifest (`library.scan`).
        max_count: the largest library count that still counts as low.
        generation: if given, the generation the table must come from.
    """
    rows = _ok(_class_table(results, generation))
    low = rows["pred"].isin(low_count_labels(manifest, max_count, rows["pred"].unique()))
    return _by_confidence(rows[low], ascending=False)


def low_count_labels(manifest: pd.DataFrame, max_count: int, classes) -> list[str]:
    """The `classes` with at most `max_count` readable library images (a class the
    library lacks has 0): the rule of `low_count_classes`, for any table or view."""
    if int(max_count) < 0:
        raise ZoolibError(f"max_count must be at least 0, got {max_count}")
    counts = class_counts(manifest).set_index("label")["readable"]
    return [c for c in classes if counts.get(c, 0) <= int(max_count)]


def synthetic_reliant(results: pd.DataFrame, manifest: pd.DataFrame, min_share: float,
                      generation: str | None = None) -> pd.DataFrame:
    """Rows predicted as classes whose readable library images are at least `min_share`
    staged or synthetic (so real photos of them are worth adding).

    Sorted by confidence, highest first.
    """
    rows = _ok(_class_table(results, generation))
    reliant = rows["pred"].isin(synthetic_reliant_labels(manifest, min_share,
                                                         rows["pred"].unique()))
    return _by_confidence(rows[reliant], ascending=False)


def synthetic_reliant_labels(manifest: pd.DataFrame, min_share: float, classes) -> list[str]:
    """The `classes` whose readable library images are at least `min_share` staged or
    synthetic (a class the library lacks has share 0): `synthetic_reliant`'s rule."""
    if not 0.0 <= float(min_share) <= 1.0:
        raise ZoolibError(f"min_share must be between 0 and 1, got {min_share}")
    counts = class_counts(manifest).set_index("label")
    share = (counts["staged"] + counts["synthetic"]) / counts["readable"].clip(lower=1)
    return [c for c in classes if share.get(c, 0.0) >= float(min_share)]


def lookalikes(results: pd.DataFrame, cls: str, max_confidence: float,
               generation: str | None = None) -> pd.DataFrame:
    """Rows predicted as `cls` with confidence below `max_confidence`, least sure first.

    Raises:
        ZoolibError: `cls` is not a class of the table's generation.
    """
    rows = _ok(_class_table(results, generation))
    check_class(cls, results.attrs.get("classes") or sorted(set(rows["pred"])),
                ", ".join(_generations(results)))
    return _by_confidence(rows[(rows["pred"] == cls)
                               & (rows["confidence"] < float(max_confidence))], ascending=True)


def check_class(cls: str, classes: list[str], generation: str = "") -> None:
    """Raise a ZoolibError naming the classes unless `cls` is one of them."""
    if cls not in classes:
        gen = generation or "this table's generation"
        raise ZoolibError(f"class {cls!r} is not a class of {gen} "
                          f"(classes: {', '.join(classes)})")


# The scores mass removal can sort by: column -> whether a low value is bad.
MASS_REMOVAL_SCORES = {"confidence": True, "margin": True, "ood": False, "knn": False}
# The best at separating junk from animals in the CIFAR replication (bench/replicate.py);
# tables without it (runs made with knn=False, older layouts) fall back to FALLBACK.
DEFAULT_MASS_REMOVAL_SCORE = "knn"
FALLBACK_MASS_REMOVAL_SCORE = "confidence"


def mass_removal_score(results: pd.DataFrame) -> str:
    """The score `lowest_scores` sorts by when not told: the default where the table
    has it, else the fallback."""
    col = DEFAULT_MASS_REMOVAL_SCORE
    has = col in results.columns and results[col].notna().any()
    return col if has else FALLBACK_MASS_REMOVAL_SCORE


def lowest_scores(results: pd.DataFrame, n: int | None = None, threshold: float | None = None,
                  by: str | None = None) -> pd.DataFrame:
    """The worst-scored rows, worst first, for mass removal.

    Args:
        results: a results table.
        n: keep at most this many rows (the bottom n).
        threshold: keep rows scoring below it (above it for "ood" and "knn").
        by: "confidence", "margin" (low is bad), "ood" or "knn" (high is bad);
            None: `mass_removal_score(results)`, the score that separated junk
            from animals best in the CIFAR replication where the table has it.
            Rows with no value for it come last.

    Raises:
        ZoolibError: neither n nor threshold given, n negative, or an unknown `by`.
    """
    by = mass_removal_score(results) if by is None else by
    if by not in MASS_REMOVAL_SCORES:
        raise ZoolibError(f"by must be one of {', '.join(MASS_REMOVAL_SCORES)}, got {by!r}")
    if n is None and threshold is None:
        raise ZoolibError("lowest_scores needs n (bottom N) or threshold (or both)")
    if n is not None and int(n) < 0:
        raise ZoolibError(f"n must be at least 0, got {n}")
    low_is_bad = MASS_REMOVAL_SCORES[by]
    rows = _ok(results).sort_values([by, "rel"], ascending=[low_is_bad, True], kind="stable")
    if threshold is not None:
        rows = rows[rows[by] < threshold] if low_is_bad else rows[rows[by] > threshold]
    return rows if n is None else rows.head(int(n))


def filed_unknown(results: pd.DataFrame, generation: str | None = None) -> pd.DataFrame:
    """Rows of files filed in the library as Unknown (see `identify_unknown`), most
    confident first: a confident prediction is a candidate label for the file."""
    rows = _ok(_class_table(results, generation))
    under = rows["rel"].fillna("").str.startswith(f"library/{UNKNOWN}/")
    return _by_confidence(rows[under], ascending=False)


def combine(*tables: pd.DataFrame) -> pd.DataFrame:
    """Several results tables of one generation as one, a row per path (first wins).

    For one view over the inbox and the library's Unknown folder, say. `attrs` keeps
    the generation and classes, and joins the names of the runs that have rows with "+".

    Raises:
        ZoolibError: no table given, or the tables come from different generations.
    """
    if not tables:
        raise ZoolibError("combine needs at least one results table")
    gens = {t.attrs.get("generation") for t in tables} | {
        g for t in tables for g in _generations(t)}
    gens.discard(None)
    if len(gens) > 1:
        raise ZoolibError(f"these results tables come from different generations "
                          f"({', '.join(sorted(gens))}): identify all with one generation")
    frame = pd.concat(tables, ignore_index=True).drop_duplicates("path", keep="first")
    frame = frame.reset_index(drop=True)
    first = tables[0].attrs
    names = dict.fromkeys(str(t.attrs.get("name", "")) for t in tables if len(t)) or \
        {str(first.get("name", "")): None}
    frame.attrs.update(name="+".join(names), generation=next(iter(gens), None),
                       classes=list(first.get("classes") or []))
    return frame


def more_like_this(results, path_or_rel: str | Path, k: int = 12) -> pd.DataFrame:
    """The `k` rows nearest to one image by cosine similarity of their embeddings.

    The image itself and unreadable files are left out; a `similarity` column (1 =
    same direction) is added. Searched through a nearest-neighbour index
    (`zoolib.ann`): exact up to `ann.EXACT_MAX` rows, approximate above.

    Args:
        results: a results table, or a `view.ResultsView` (whose index is kept, so
            asking again costs a search, not a build).
        path_or_rel: the chosen image, as its absolute path or its `rel`.
        k: how many neighbours.

    Raises:
        ZoolibError: the image is not in the table, or could not be read.
    """
    from .view import ResultsView

    if int(k) < 1:
        raise ZoolibError(f"k must be at least 1, got {k}")
    view = results if isinstance(results, ResultsView) else \
        ResultsView.from_frame(_class_table(results, None))
    key = str(path_or_rel)
    found = view.positions([key])
    if not len(found):
        raise ZoolibError(f"{key} is not in this results table")
    if not view.ok[found[0]]:
        error = view.rows(found[:1])["error"].iloc[0]
        raise ZoolibError(f"{key} could not be read ({error}): it has no embedding")
    near, sims = view.nearest(int(found[0]), int(k))
    return view.rows(near).assign(similarity=sims.astype(np.float64))
