"""The curation widget: browse each problem list with thumbnails and fix it, with undo.

A thin ipywidgets layer over `curate` and `cleaning`: every button calls one
tested function there (rotate, discard, pin, set_source, relabel, mark checked,
journal.trash for non-keepers, undo), so every action lands in the workspace
journal. Nothing in zoolib imports it.

    w = CurationWidget(ws, {"label issues": issues, "near duplicates": groups})
    w.show()

Below the actions, `JournalView` pages through the curation events, newest
first: each page is one `journal.read` with a limit and an offset plus a
`journal.count`, so a long journal costs what one page costs.
"""
from __future__ import annotations

import ipywidgets as W
import pandas as pd

from .. import curate, journal
from ..workspace import Workspace, class_folders
from .grid import Item, ThumbGrid

THUMB = 128
MAX_TILES = 12  # a problem item (a duplicate group) shows at most this many images
JOURNAL_PAGE = 10  # events per journal page
JOURNAL_COLUMNS = ["id", "time", "action", "path", "dest", "label", "undone"]


def item_paths(row: pd.Series) -> list[str]:
    """The library paths a problem row is about (a group's paths, a pair, or a path)."""
    if "paths" in row:
        return list(row["paths"])
    if "path_a" in row:
        return [row["path_a"], row["path_b"]]
    return [row["path"]]


def _caption(row: pd.Series, path: str, keeper: bool) -> str:
    """A tile's text: the file name, and for a label issue the given and suggested class."""
    if "suggested" in row and "path" in row and row["path"] == path:
        return f"{row['label']} → {row['suggested']}?"
    return path.rsplit("/", 1)[-1] + (" (keeper)" if keeper else "")


class JournalView:
    """Journal events a page at a time, newest first, with previous/next buttons.

    Args:
        ws: the workspace.
        actions: the actions shown (default: the curation actions).
        page_size: events per page.
    """

    def __init__(self, ws: Workspace, actions=curate.CURATION_ACTIONS,
                 page_size: int = JOURNAL_PAGE):
        self.ws, self.actions, self.page_size, self.page = ws, tuple(actions), page_size, 0
        self.rows = pd.DataFrame(columns=JOURNAL_COLUMNS)  # the page on screen
        self.table, self.info = W.HTML(), W.Label()
        self.previous = W.Button(description="◀ newer")
        self.next = W.Button(description="older ▶")
        self.previous.on_click(lambda _: self.show_page(self.page - 1))
        self.next.on_click(lambda _: self.show_page(self.page + 1))
        self.widget = W.VBox([W.HBox([self.previous, self.info, self.next]), self.table])
        self.show_page(0)

    def show_page(self, page: int) -> None:
        """Query and draw one page (0 = newest); the number is clamped to the pages."""
        total = journal.count(self.ws, actions=self.actions)
        pages = max(1, -(-total // self.page_size))  # an empty journal: page 1 of 1
        self.page = min(max(page, 0), pages - 1)
        self.rows = journal.read(self.ws, actions=self.actions, columns=JOURNAL_COLUMNS,
                                 limit=self.page_size, offset=self.page * self.page_size,
                                 newest_first=True)
        self.table.value = self.rows.to_html(index=False, na_rep="", escape=True)
        self.info.value = f"page {self.page + 1} of {pages} ({total} events)"
        self.previous.disabled = self.page == 0
        self.next.disabled = self.page >= pages - 1


class CurationWidget:
    """Problem lists with thumbnails and the curation actions.

    Args:
        ws: the workspace.
        lists: problem lists by name (DataFrames from curate or cleaning:
            near_duplicates, leakage, exif_disagreements, unreadable,
            label_issues, or any frame with a path column).
    """

    def __init__(self, ws: Workspace, lists: dict[str, pd.DataFrame]):
        self.ws, self.lists = ws, {k: v.reset_index(drop=True) for k, v in lists.items()}
        self.which = W.Dropdown(options=list(self.lists), description="list")
        self.index = W.BoundedIntText(min=0, max=0, description="item")
        self.grid = ThumbGrid(MAX_TILES, THUMB, columns=6)
        self.pictures = self.grid.widget
        self.reason = W.Text(value="subject too small to zoom", description="reason")
        self.split = W.Dropdown(options=["train", "valid", "test"], value="test",
                                description="pin to")
        self.source = W.Dropdown(options=["real", "staged", "synthetic"], description="source")
        self.relabel_to = W.Combobox(options=[f.name for f in class_folders(ws)],
                                     description="class", ensure_option=False)
        self.log = W.Output()
        self.journal = JournalView(ws)
        buttons = [("rotate 90", lambda p: [curate.rotate(ws, x, 90) for x in p]),
                   ("rotate 180", lambda p: [curate.rotate(ws, x, 180) for x in p]),
                   ("rotate 270", lambda p: [curate.rotate(ws, x, 270) for x in p]),
                   ("discard", lambda p: [curate.discard(ws, p, self.reason.value)]),
                   ("undiscard", lambda p: [curate.undiscard(ws, p)]),
                   ("pin", lambda p: [curate.pin(ws, p, self.split.value)]),
                   ("set source", lambda p: [curate.set_source(ws, p, self.source.value)]),
                   ("relabel", lambda p: [curate.relabel(ws, p, self.relabel_to.value)]),
                   ("checked", lambda p: [curate.mark_checked(ws, p)]),
                   ("trash", lambda p: [journal.trash(ws, f"library/{x}", "curation")
                                        for x in p])]
        self.buttons = [self._button(name, act) for name, act in buttons]
        undo = W.Button(description="undo last", button_style="warning")
        undo.on_click(lambda _: self._run(lambda: [curate.undo(ws, self._last_event())]))
        self.buttons.append(undo)
        self.which.observe(lambda _: self._reset(), "value")
        self.index.observe(lambda _: self._render(), "value")
        self.box = W.VBox([W.HBox([self.which, self.index]), self.pictures,
                           W.HBox([self.reason, self.split, self.source, self.relabel_to]),
                           W.HBox(self.buttons, layout=W.Layout(flex_flow="row wrap")),
                           self.log, self.journal.widget])
        self._reset()

    @property
    def selected(self) -> list[str]:
        """The selected library paths, in the order they are shown."""
        return [p for p in self.current() if p in self.grid.selected]

    def _button(self, name, act) -> W.Button:
        button = W.Button(description=name)
        button.on_click(lambda _: self._run(lambda: act(self.selected)))
        return button

    def _last_event(self) -> int:
        rows = curate.history(self.ws, columns=["id", "undone"])
        rows = rows[~rows["undone"]]
        if rows.empty:
            raise ValueError("nothing to undo")
        return int(rows["id"].iloc[0])

    def _run(self, action) -> None:
        with self.log:
            try:
                ids = action()
                print(f"journal events {ids}")
            except Exception as exc:  # noqa: BLE001 - show the message, keep the widget alive
                print(f"error: {exc}")
        self.journal.show_page(0)  # the newest events: what was just done
        self._render()

    def row(self) -> pd.Series | None:
        """The problem row on screen (None for an empty list)."""
        table = self.lists[self.which.value]
        return table.iloc[self.index.value] if len(table) else None

    def current(self) -> list[str]:
        """Paths of the item on screen."""
        row = self.row()
        return item_paths(row)[:MAX_TILES] if row is not None else []

    def _reset(self) -> None:
        self.index.max = max(len(self.lists[self.which.value]) - 1, 0)
        self.index.value = 0
        self._render()

    def _render(self) -> None:
        row, paths = self.row(), self.current()
        self.grid.selected.clear()  # preselect: non-keepers of a group, else the image itself
        self.grid.selected.update(paths[1:] if self.which.value.startswith("near") else paths[:1])
        if row is not None and "suggested" in row:
            self.relabel_to.value = str(row["suggested"])
        self.grid.show([Item(p, str(self.ws.library / p), _caption(row, p, k == 0 and
                                                                     len(paths) > 1), tip=p)
                        for k, p in enumerate(paths)])

    def show(self):
        """The widget, for display in a notebook cell."""
        return self.box
