"""The curation widget: browse each problem list with thumbnails and fix it, with undo.

A thin ipywidgets layer over `curate`: every button calls one tested function
there (rotate, discard, pin, set_source, journal.trash for non-keepers, undo),
so every action lands in the workspace journal. Nothing in zoolib imports it.

    w = CurationWidget(ws, {"near duplicates": groups, "leakage": leaks})
    w.show()
"""
from __future__ import annotations

import io

import ipywidgets as W
import pandas as pd
from PIL import Image

from . import curate, journal
from .images import load_rgb
from .workspace import Workspace

THUMB = 128


def item_paths(row: pd.Series) -> list[str]:
    """The library paths a problem row is about (a group's paths, a pair, or a path)."""
    if "paths" in row:
        return list(row["paths"])
    if "path_a" in row:
        return [row["path_a"], row["path_b"]]
    return [row["path"]]


def thumbnail(ws: Workspace, path: str, size: int = THUMB) -> bytes:
    """PNG bytes of an upright thumbnail (a grey square when the file cannot be read)."""
    try:
        img = load_rgb(ws.library / path)
        img.thumbnail((size, size))
    except Exception:  # noqa: BLE001 - unreadable files are a problem list too
        img = Image.new("RGB", (size, size), (128, 128, 128))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class CurationWidget:
    """Problem lists with thumbnails and the curation actions.

    Args:
        ws: the workspace.
        lists: problem lists by name (DataFrames from curate: near_duplicates,
            leakage, exif_disagreements, unreadable, or any frame with a path column).
    """

    def __init__(self, ws: Workspace, lists: dict[str, pd.DataFrame]):
        self.ws, self.lists = ws, {k: v.reset_index(drop=True) for k, v in lists.items()}
        self.which = W.Dropdown(options=list(self.lists), description="list")
        self.index = W.BoundedIntText(min=0, max=0, description="item")
        self.pictures = W.HBox()
        self.selected = W.SelectMultiple(description="images", rows=4)
        self.reason = W.Text(value="subject too small to zoom", description="reason")
        self.split = W.Dropdown(options=["train", "valid", "test"], value="test",
                                description="pin to")
        self.source = W.Dropdown(options=["real", "staged", "synthetic"], description="source")
        self.log = W.Output()
        buttons = [("rotate 90", lambda p: [curate.rotate(ws, x, 90) for x in p]),
                   ("rotate 180", lambda p: [curate.rotate(ws, x, 180) for x in p]),
                   ("rotate 270", lambda p: [curate.rotate(ws, x, 270) for x in p]),
                   ("discard", lambda p: [curate.discard(ws, p, self.reason.value)]),
                   ("undiscard", lambda p: [curate.undiscard(ws, p)]),
                   ("pin", lambda p: [curate.pin(ws, p, self.split.value)]),
                   ("set source", lambda p: [curate.set_source(ws, p, self.source.value)]),
                   ("trash", lambda p: [journal.trash(ws, f"library/{x}", "curation")
                                        for x in p])]
        self.buttons = [self._button(name, act) for name, act in buttons]
        undo = W.Button(description="undo last", button_style="warning")
        undo.on_click(lambda _: self._run(lambda: [curate.undo(ws, self._last_event())]))
        self.buttons.append(undo)
        self.which.observe(lambda _: self._reset(), "value")
        self.index.observe(lambda _: self._render(), "value")
        self.box = W.VBox([W.HBox([self.which, self.index]), self.pictures, self.selected,
                           W.HBox([self.reason, self.split, self.source]),
                           W.HBox(self.buttons), self.log])
        self._reset()

    def _button(self, name, act) -> W.Button:
        button = W.Button(description=name)
        button.on_click(lambda _: self._run(lambda: act(list(self.selected.value))))
        return button

    def _last_event(self) -> int:
        rows = curate.history(self.ws)
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
        self._render()

    def current(self) -> list[str]:
        """Paths of the item on screen."""
        table = self.lists[self.which.value]
        return item_paths(table.iloc[self.index.value]) if len(table) else []

    def _reset(self) -> None:
        self.index.max = max(len(self.lists[self.which.value]) - 1, 0)
        self.index.value = 0
        self._render()

    def _render(self) -> None:
        paths = self.current()
        self.pictures.children = [
            W.VBox([W.Image(value=thumbnail(self.ws, p), format="png"),
                    W.Label(p + (" (keeper)" if k == 0 and len(paths) > 1 else ""))])
            for k, p in enumerate(paths)]
        self.selected.options = paths
        self.selected.value = tuple(paths[1:] if self.which.value.startswith("near")
                                    else paths[:1])

    def show(self):
        """The widget, for display in a notebook cell."""
        return self.box
