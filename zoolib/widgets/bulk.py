"""An ipywidgets view over a bulk-identification results table.

The view is a thin layer. What it shows comes from pure functions tested
without a browser: `filter_sets` (the bulkid filters as boolean masks),
`select_rows` (filter, class, confidence band, mark, sort) and `page_of`. What
its buttons do is `zoolib.actions` (journaled add, discard, undo, export); the
marks it draws are read back from the journal after every action, so they
survive re-filtering and restarting the kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import ipywidgets as w
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .. import actions, library
from ..bulkid.filters import (DEFAULT_MASS_REMOVAL_SCORE, FALLBACK_MASS_REMOVAL_SCORE,
                              MASS_REMOVAL_SCORES, check_class, low_count_labels,
                              synthetic_reliant_labels)
from ..bulkid.view import PAGE_COLUMNS, ResultsView
from ..workspace import UNKNOWN, Workspace, ZoolibError
from .grid import Item, ThumbGrid

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


def caption(row, status: str) -> str:
    """The text under a thumbnail: predicted class and confidence, and the mark."""
    if row["error"]:
        text = "unreadable"
    else:
        text = f"{row['pred']} {row['confidence']:.2f}"
    return {"added": "✓ ", "discarded": "✗ "}.get(status, "") + text


class BulkView:
    """The widget: filter controls, a paged thumbnail grid, selection and actions.

    Args:
        ws: the workspace (journal, library, trash).
        results: bulk-identification results: a table (bulkid.run / load_results) or,
            for big runs, a lazy `bulkid.open_view` (rows read a page at a time).
        masks: filter name -> mask, from `filter_sets`.
        run: the run name (journal details, default export file).
        classes: class names offered for "add to library" (any plain name may be typed).
        page_size: thumbnails per page.
        thumb_size: thumbnail edge in pixels.
        columns: tiles per grid row.
    """

    def __init__(self, ws: Workspace, results, masks: dict, run: str = "",
                 classes: list[str] | None = None, page_size: int = 24,
                 thumb_size: int = 96, columns: int = 6):
        self.ws, self.run, self.thumb_size = ws, run, thumb_size
        self.view = as_view(results.reset_index(drop=True) if isinstance(results, pd.DataFrame)
                            else results)
        self.masks = {k: np.asarray(v, dtype=bool) for k, v in masks.items()}
        self.orders: dict[str, np.ndarray] = {}  # "similarity", after "more like this"
        self.state = ViewState(page_size=page_size)
        self._busy = False
        self._build_controls(classes or list(self.view.classes))
        self.thumbs = ThumbGrid(page_size, thumb_size, columns, on_change=self._update_label)
        self.selected, self.tiles, self.grid = (self.thumbs.selected, self.thumbs.tiles,
                                                self.thumbs.widget)
        self.widget = w.VBox([self.filters, self.paging, self.grid, self.action_bar,
                              self.message])
        self.reload_marks()

    # ---- building -------------------------------------------------------------------
    def _build_controls(self, classes: list[str]) -> None:
        self.filter = w.Dropdown(options=self._filter_options(), description="filter")
        self.pred = w.Dropdown(options=[ANY_CLASS, *self.view.classes], description="class")
        self.conf = w.FloatRangeSlider(value=(0.0, 1.0), min=0.0, max=1.0, step=0.01,
                                       description="confidence", continuous_update=False)
        self.status = w.Dropdown(options=STATUSES, value="open", description="marks")
        self.sort = w.Dropdown(options=list(SORTS), description="sort")
        for control, cls in ((self.filter, "zoolib-filter"), (self.pred, "zoolib-class"),
                             (self.conf, "zoolib-conf"), (self.status, "zoolib-status"),
                             (self.sort, "zoolib-sort")):
            control.add_class(cls)
            control.observe(self._controls_changed, "value")
        self.filters = w.HBox([self.filter, self.pred, self.conf, self.status, self.sort],
                              layout=w.Layout(flex_flow="row wrap"))
        self.prev, self.next = w.Button(description="◀", layout=w.Layout(width="40px")), \
            w.Button(description="▶", layout=w.Layout(width="40px"))
        self.prev.on_click(lambda _: self.go(self.state.page - 1))
        self.next.on_click(lambda _: self.go(self.state.page + 1))
        self.page_label = w.Label()
        self.page_label.add_class("zoolib-page")
        select_page, clear = w.Button(description="select page"), w.Button(description="clear")
        select_page.on_click(lambda _: self.select_page())
        clear.on_click(lambda _: self.clear_selection())
        self.paging = w.HBox([self.prev, self.page_label, self.next, select_page, clear])
        self.label = w.Combobox(options=classes, placeholder="class name",
                                description="add as", ensure_option=False)
        self.move = w.Checkbox(value=False, description="move (default: copy)", indent=False)
        buttons = {"add to library": self.add, "discard": self.discard, "undo last": self.undo,
                   "more like this": self.more_like_this, "export selection": self.export}
        self.buttons = {}
        for text, handler in buttons.items():
            button = w.Button(description=text, button_style="danger" if text == "discard"
                              else "")
            button.on_click(lambda _, h=handler: self._act(h))
            self.buttons[text] = button
        self.export_path = w.Text(value=f"bulkid/{self.run or 'selection'}/selection.csv",
                                  description="CSV")
        self.action_bar = w.HBox([self.label, self.move, *self.buttons.values(),
                                  self.export_path], layout=w.Layout(flex_flow="row wrap"))
        self.message = w.HTML()

    def _filter_options(self) -> list[tuple[str, str]]:
        return [(f"{FILTER_TITLES.get(k, k)} ({int(m.sum())})", k) for k, m in self.masks.items()]

    # ---- state -----------------------------------------------------------------------
    def reload_marks(self) -> None:
        """Re-read the marks from the journal and redraw (after any action)."""
        self.marks = actions.marks(self.ws)
        self.status_col = self.view.status_codes(self.marks, STATUS_CODES)
        self.dest = dict(zip(self.marks["path"], self.marks["dest"]))
        self.refresh()

    def _controls_changed(self, _change=None) -> None:
        if not self._busy:
            self.state = replace(self.state, filter=self.filter.value, pred=self.pred.value,
                                 conf=tuple(self.conf.value), status=self.status.value,
                                 sort=self.sort.value, page=0)
            self.refresh()

    def go(self, page: int) -> None:
        """Show page `page` (clamped)."""
        last = n_pages(self.total, self.state.page_size) - 1
        self.state = replace(self.state, page=min(max(page, 0), last))
        if len(self.rows) < min(self.total, (self.state.page + 1) * self.state.page_size):
            self._select()  # a page past the positions found so far
        self._draw()

    def refresh(self) -> None:
        """Recompute the rows the controls select and draw the current page."""
        self._select()
        self.go(self.state.page)

    def _select(self) -> None:
        """The positions up to the current page (`select_head`) and how many in all."""
        need = (self.state.page + 1) * self.state.page_size
        self.rows, self.total = select_head(self.view, self.state, self.masks,
                                            self.status_col, self.orders, need)

    def page_rows(self) -> pd.DataFrame:
        """The result rows on the current page."""
        return self.view.rows(page_of(self.rows, self.state.page, self.state.page_size),
                              PAGE_COLUMNS)

    def _draw(self) -> None:
        styles = {"added": "success", "discarded": "danger"}
        items = []
        for pos, row in self.page_rows().iterrows():
            status = STATUS_NAMES[int(self.status_col[pos])]
            items.append(Item(row["path"], self._where(row["path"]), caption(row, status),
                              row["rel"], styles.get(status, "")))
        self.thumbs.show(items)
        self._update_label()

    def _update_label(self) -> None:
        self.page_label.value = (f"page {self.state.page + 1} / "
                                 f"{n_pages(self.total, self.state.page_size)} · "
                                 f"{self.total} images · {len(self.selected)} selected")

    def _where(self, path: str) -> str:
        """Where a file is now (a discarded file is in the trash)."""
        if not Path(path).exists() and path in self.dest:
            return str(self.ws.root / self.dest[path])
        return path

    # ---- selection (kept by the grid across pages) --------------------------------------
    def select(self, paths) -> None:
        """Add files (absolute paths) to the selection."""
        self.thumbs.select(paths)

    def select_page(self) -> None:
        """Select every image on the current page."""
        self.thumbs.select_shown()

    def clear_selection(self) -> None:
        self.thumbs.clear()

    # ---- actions (each one journaled by zoolib.actions) ---------------------------------
    def _act(self, handler) -> None:
        """Run a button's handler; a ZoolibError becomes a message, not a traceback."""
        try:
            self.message.value = handler()
        except ZoolibError as exc:
            self.message.value = f"<span style='color:#b00'>{exc}</span>"

    def add(self) -> str:
        """Add the selection to the library under the typed class name."""
        events = actions.add_to_library(self.ws, sorted(self.selected), self.label.value,
                                        move=self.move.value, run=self.run)
        self.selected.clear()
        self.reload_marks()
        return f"{len(events)} image(s) {'moved' if self.move.value else 'copied'} " \
               f"to library/{self.label.value}"

    def discard(self) -> str:
        """Move the selection to the workspace's _trash/."""
        events = actions.discard(self.ws, sorted(self.selected), run=self.run)
        self.selected.clear()
        self.reload_marks()
        return f"{len(events)} image(s) moved to _trash/"

    def undo(self) -> str:
        """Undo the latest add or discard click."""
        events = actions.undo_last(self.ws)
        self.reload_marks()
        return f"undid {len(events)} action(s)" if events else "nothing to undo"

    def more_like_this(self, k: int | None = None) -> str:
        """Show the selected image and its `k` nearest by embedding, nearest first
        (default: as many as fill the first page)."""
        if len(self.selected) != 1:
            raise ZoolibError("select exactly one image for 'more like this'")
        (path,) = self.selected
        (chosen,) = self.view.positions([path])[:1]
        near, _ = self.view.nearest(int(chosen), k or max(1, self.state.page_size - 1))
        first = np.concatenate([[chosen], near])
        like = np.zeros(len(self.view), bool)
        like[first] = True
        self.masks["like"] = like
        # the chosen image, its neighbours nearest first, then every other row
        self.orders["similarity"] = np.concatenate([first, np.flatnonzero(~like)])
        self._busy = True
        try:
            self.filter.options = self._filter_options()
            self.filter.value, self.sort.value = "like", "similarity, nearest first"
            self.status.value = "all"  # the chosen image may already be marked
        finally:
            self._busy = False
        self._controls_changed()
        return f"{len(near)} images like {Path(path).name}, nearest first"

    def export(self) -> str:
        """Write the selection (with marks) as CSV."""
        chosen = self.view.rows(self.view.positions(self.selected))
        out = actions.export_selection(self.ws, chosen, sorted(self.selected),
                                       self.export_path.value, run=self.run)
        return f"{len(self.selected)} row(s) written to {out}"

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
