"""Which rows of a results table a person sees: the bulkid filters as masks, and the
selection, order and pages of the results widget.

The widget (`widgets.bulk.BulkView`) only draws what these pure functions choose,
so they are tested without a browser: `filter_sets` (the rules of
`bulkid.filters`, evaluated on a `ResultsView`'s arrays, so ten million rows cost
a few vector operations), `select_rows` (filter, class, confidence band, mark,
sort) and `page_of`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .. import library
from ..workspace import UNKNOWN, ZoolibError
from .filters import (DEFAULT_MASS_REMOVAL_SCORE, FALLBACK_MASS_REMOVAL_SCORE,
                      MASS_REMOVAL_SCORES, check_class, low_count_labels,
                      synthetic_reliant_labels)
from .view import ResultsView


ANY_CLASS = "(any class)"
STATUSES = ("open", "all", "added", "discarded")  # "open": not yet added or discarded
# Sort label -> (column, ascending). Low confidence first is the useful default:
# those are the images a person should look at.
SORTS = {"confidence, low first": ("confidence", True),
         "confidence, high first": ("confidence", False),
         "margin, low first": ("margin", True), "entropy, high first": ("entropy", False),
         "out-of-distribution, high first": ("ood", False),
         "far from the library, high first": ("knn", False),
         "predicted class": ("pred", True), "path": ("rel", True),
         # Filled by "more like this" (the chosen image first, at 1.0); empty otherwise.
         "similarity, nearest first": ("similarity", False)}
FILTER_TITLES = {"all": "all readable", "low_count": "low-count classes",
                 "synthetic_reliant": "synthetic-reliant classes", "lookalikes": "look-alikes",
                 "unknown": "filed as Unknown", "lowest": "lowest scores",
                 "unreadable": "unreadable files", "like": "more like this"}


@dataclass(frozen=True)
class ViewState:
    """What the filter controls say.

    Attributes:
        filter: a key of the filter masks ("all", "low_count", ...).
        pred: predicted class to keep, or ANY_CLASS.
        conf: inclusive confidence band (low, high).
        status: one of STATUSES.
        sort: a key of SORTS.
        page: page number, from 0.
        page_size: tiles per page.
    """

    filter: str = "all"
    pred: str = ANY_CLASS
    conf: tuple[float, float] = (0.0, 1.0)
    status: str = "open"
    sort: str = "confidence, low first"
    page: int = 0
    page_size: int = 24


STATUS_CODES = {"": 0, "added": 1, "discarded": 2}  # a mark per row, as a small int
STATUS_NAMES = {code: name for name, code in STATUS_CODES.items()}


def as_view(results) -> ResultsView:
    """A `ResultsView` of a results table (a view is returned as it is)."""
    return results if isinstance(results, ResultsView) else ResultsView.from_frame(results)


def filter_sets(results, manifest: pd.DataFrame, max_count: int = 49,
                min_share: float = 0.4, lookalike_class: str = "",
                max_confidence: float = 0.8, lowest_n: int = 24) -> dict:
    """The named filters of the widget (and of the batch CSVs), as boolean masks.

    The rules are the bulkid filters' (`bulkid.low_count_classes` and the rest),
    evaluated on a view's arrays, so ten million rows cost a few vector operations.

    Args:
        results: bulk-identification results (a DataFrame or a `ResultsView`).
        manifest: the library manifest (library.scan), for class counts and sources.
        max_count: "low_count": predicted classes with at most this many library images.
        min_share: "synthetic_reliant": predicted classes whose library images are at
            least this share staged or synthetic.
        lookalike_class: "lookalikes": images predicted as this class with a
            confidence below `max_confidence` (left out when empty).
        max_confidence: see `lookalike_class`.
        lowest_n: "lowest": the n worst-scored images (`bulkid.lowest_scores`: farthest
            from the training images where the run has the knn score, else least sure).

    Returns:
        Filter name -> mask aligned with `results` (boolean Series for a DataFrame,
        numpy arrays for a view); "all" holds the readable rows and "unreadable" the
        files that could not be decoded; "unknown" (only when the table holds such
        rows, see `bulkid.combine`) the files filed in the library as Unknown.
    """
    view = as_view(results)
    ok = view.ok
    sets = {"all": ok,
            "low_count": view.is_pred(low_count_labels(manifest, max_count, view.classes)),
            "synthetic_reliant": view.is_pred(synthetic_reliant_labels(manifest, min_share,
                                                                       view.classes))}
    if lookalike_class:
        check_class(lookalike_class, view.attrs.get("classes") or view.classes,
                    str(view.attrs.get("generation") or ""))
        sets["lookalikes"] = view.is_pred([lookalike_class]) & (
            view.scores["confidence"] < float(max_confidence))
    unknown = view.under(f"library/{UNKNOWN}/") & ok
    if unknown.any():
        sets["unknown"] = unknown
    sets["lowest"] = lowest_mask(view, lowest_n)
    sets["unreadable"] = ~ok
    masks = {name: mask & ok if name != "unreadable" else mask for name, mask in sets.items()}
    if isinstance(results, pd.DataFrame):
        return {name: pd.Series(mask, index=results.index) for name, mask in masks.items()}
    return masks


def lowest_mask(view: ResultsView, n: int) -> np.ndarray:
    """The `n` worst-scored readable rows (`bulkid.lowest_scores`' rule: its default
    score, worst first, equal scores by rel), as a mask."""
    n = int(n)
    if n <= 0:
        return np.zeros(len(view), bool)
    if n >= np.count_nonzero(view.ok):  # every readable row: no order needed
        return view.ok.copy()
    by = "knn" if np.isfinite(view.scores[DEFAULT_MASS_REMOVAL_SCORE]).any() \
        else FALLBACK_MASS_REMOVAL_SCORE
    # worst first through the n-th and the rows tied with it: a partition, not a sort
    ranked = view.head(view.ok, by, MASS_REMOVAL_SCORES[by], n)
    top, mask = ranked[:n], np.zeros(len(view), bool)
    if len(top) == len(ranked):
        mask[top] = True
        return mask
    key = view.scores[by]
    last = key[top[-1]]
    tied = ranked[(key[ranked] == last) | (np.isnan(key[ranked]) & np.isnan(last))]
    sure = top[~np.isin(top, tied)]
    by_rel = pc.sort_indices(view.rel.take(pa.array(tied))).to_numpy()
    mask[sure] = True
    mask[tied[by_rel][:len(top) - len(sure)]] = True
    return mask


def rare_classes(results: pd.DataFrame, manifest: pd.DataFrame, min_images: int = 40
                 ) -> pd.DataFrame:
    """The generation's classes below the `min_images` cutoff and how many inbox images
    it predicts as each: what a throw-away generation is run for.

    Returns:
        Columns label, readable (library images), short_by, predicted (inbox rows),
        mean_confidence; one row per class of the generation below the cutoff.
    """
    table = library.cutoff_table(manifest, min_images)
    classes = results.attrs.get("classes") or sorted(results["pred"].dropna().unique())
    rare = table[(table["short_by"] > 0) & table["label"].isin(classes)]
    ok = results[results["error"].fillna("") == ""]
    stats = ok.groupby("pred")["confidence"].agg(["size", "mean"])
    out = rare[["label", "readable", "short_by"]].assign(
        predicted=rare["label"].map(stats["size"]).fillna(0).astype(int),
        mean_confidence=rare["label"].map(stats["mean"]).round(3))
    return out.reset_index(drop=True)


def select_rows(results, state: ViewState, masks: dict, status,
                orders: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Row positions of `results` that the view shows, in display order.

    Each sort is an order of every row computed once (`ResultsView.order`), so a
    filter change costs one gather over the rows, not a sort.

    Args:
        results: bulk-identification results (a DataFrame or a `ResultsView`).
        state: the filter controls.
        masks: from `filter_sets` (plus any "more like this" mask).
        status: mark per row: strings ("", "added", "discarded", as
            `actions.status_of` gives) or their STATUS_CODES.
        orders: sort column -> every position in order, overriding the view's
            (the widget's "similarity" after "more like this"; else row order).

    Raises:
        ZoolibError: unknown filter, status or sort.
    """
    return select_head(results, state, masks, status, orders)[0]


def select_head(results, state: ViewState, masks: dict, status,
                orders: dict[str, np.ndarray] | None = None, need: int | None = None
                ) -> tuple[np.ndarray, int]:
    """`select_rows`, told how many positions are needed: (positions, how many rows
    the view shows). The positions are right as far as they go and hold at least
    `need` of them (all, without `need`); what the widget asks for a page."""
    view = as_view(results)
    keep = _kept(view, state, masks, status)
    column, ascending = SORTS[state.sort]
    order = (orders or {}).get(column)
    if order is not None:
        rows = order[keep[order]]
    elif column == "similarity":
        rows = np.flatnonzero(keep)
    else:
        rows = view.sorted(keep, column, ascending, need)
    return rows, int(np.count_nonzero(keep))


def _kept(view: ResultsView, state: ViewState, masks: dict, status) -> np.ndarray:
    """Whether each row passes the controls (see `select_rows`)."""
    for value, known, what in ((state.filter, masks, "filter"), (state.status, STATUSES,
                               "status"), (state.sort, SORTS, "sort")):
        if value not in known:
            raise ZoolibError(f"unknown {what} {value!r}: choose from {', '.join(known)}")
    keep = np.asarray(masks[state.filter], dtype=bool).copy()
    if state.pred != ANY_CLASS:
        keep &= view.pred == view.code(state.pred)
    low, high = state.conf
    if (low, high) != (0.0, 1.0):
        conf = view.scores["confidence"]
        keep &= (conf >= low) & (conf <= high)
    if state.status != "all":
        keep &= _codes(status) == STATUS_CODES["" if state.status == "open" else state.status]
    return keep


def _codes(status) -> np.ndarray:
    """STATUS_CODES of a mark per row (strings or codes already)."""
    values = np.asarray(status)
    if values.dtype.kind in "iu":
        return values
    return pd.Series(values).map(STATUS_CODES).fillna(0).to_numpy(np.int8)


def n_pages(n_rows: int, page_size: int) -> int:
    """Pages needed for `n_rows` (at least one, so an empty view shows page 1 of 1)."""
    return max(1, -(-n_rows // page_size))


def page_of(rows: np.ndarray, page: int, page_size: int) -> np.ndarray:
    """The row positions on one page; the page number is clamped to the last page."""
    page = min(max(page, 0), n_pages(len(rows), page_size) - 1)
    return rows[page * page_size:(page + 1) * page_size]
