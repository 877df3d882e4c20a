"""An ipywidgets view over a bulk-identification results table.

The view only draws. What it shows is chosen by `bulkid.selection` (the bulkid
filters as masks, the selection, order and pages), tested without a browser.
What its buttons do is `zoolib.actions` (journaled add, discard, undo, export);
the marks it draws are read back from the journal after every action, so they
survive re-filtering and restarting the kernel.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import ipywidgets as w
import numpy as np
import pandas as pd

from .. import actions
from ..bulkid.selection import (ANY_CLASS, FILTER_TITLES, SORTS, STATUS_CODES,  # noqa: F401
                                STATUS_NAMES, STATUSES, ViewState, as_view, filter_sets,
                                lowest_mask, n_pages, page_of, rare_classes, select_head,
                                select_rows)
from ..bulkid.view import PAGE_COLUMNS
from ..workspace import Workspace, ZoolibError
from .grid import Item, ThumbGrid


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
