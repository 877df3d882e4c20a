"""The one thumbnail grid the bulk, curation and review views share.

A grid of tiles (a thumbnail and a toggle button each), a set of selected
paths that survives paging, and cached thumbnails decoded at reduced size.
The views decide what each tile says; the grid only draws and selects.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import ipywidgets as w
from PIL import Image, ImageOps

from ..images import open_image, to_rgb


@lru_cache(maxsize=1)
def _placeholder(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 200, 200)).save(buf, "JPEG")
    return buf.getvalue()


@lru_cache(maxsize=8192)
def thumbnail(path: str, size: int = 96) -> bytes:
    """Small JPEG bytes of an image (upright), cached; a grey square if unreadable.

    JPEG draft mode decodes at a reduced scale, so a large photo costs little more
    than a small one. The cache is keyed by path: a rotated image keeps its old
    thumbnail until `thumbnail.cache_clear()`.
    """
    try:
        with open_image(path) as img:
            img.draft("RGB", (size, size))
            img = to_rgb(ImageOps.exif_transpose(img))
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=80)
            return buf.getvalue()
    except Exception:  # noqa: BLE001 - a broken file gets the placeholder, never an error
        return _placeholder(size)


@dataclass(frozen=True)
class Item:
    """What one tile shows.

    Attributes:
        path: the file's key in the selection (absolute path or library path).
        image: the file to draw (where it is now: a discarded file is in the trash).
        text: the toggle's caption.
        tip: the toggle's tooltip.
        style: the toggle's button style ("", "success", "danger", "warning", "info").
    """

    path: str
    image: str
    text: str = ""
    tip: str = ""
    style: str = ""


class _Tile:
    """One grid cell: a thumbnail and a toggle that selects it."""

    def __init__(self, size: int, on_toggle: Callable[["_Tile", bool], None]):
        self.path, self.size = "", size
        self.image = w.Image(format="jpeg", width=size, height=size)
        self.toggle = w.ToggleButton(layout=w.Layout(width=f"{size + 24}px"))
        self.toggle.observe(lambda change: on_toggle(self, change["new"]), "value")
        self.box = w.VBox([self.image, self.toggle], layout=w.Layout(align_items="center"))
        self.box.add_class("zoolib-tile")

    def show(self, item: Item, selected: bool) -> None:
        self.path = item.path
        self.image.value = thumbnail(item.image, self.size)
        self.toggle.description, self.toggle.tooltip = item.text, item.tip
        self.toggle.button_style, self.toggle.value = item.style, selected
        self.box.layout.display = None

    def hide(self) -> None:
        self.path = ""
        self.box.layout.display = "none"


class ThumbGrid:
    """A fixed number of tiles showing a page of items, with a selection across pages.

    Args:
        n_tiles: tiles on screen (a page).
        size: thumbnail edge in pixels.
        columns: tiles per row.
        on_change: called with no argument after the selection changes.
    """

    def __init__(self, n_tiles: int, size: int = 96, columns: int = 6,
                 on_change: Callable[[], None] | None = None):
        self.selected: set[str] = set()
        self.items: list[Item] = []
        self.on_change = on_change or (lambda: None)
        self._busy = False
        self.tiles = [_Tile(size, self._toggled) for _ in range(n_tiles)]
        self.widget = w.GridBox([t.box for t in self.tiles], layout=w.Layout(
            grid_template_columns=f"repeat({columns}, {size + 32}px)"))
        self.widget.add_class("zoolib-grid")

    def show(self, items: list[Item]) -> None:
        """Draw these items (at most one per tile); hide the tiles left over."""
        self.items = list(items)[:len(self.tiles)]
        self._busy = True  # setting toggles while drawing is not a user's click
        try:
            for tile, item in zip(self.tiles, self.items):
                tile.show(item, item.path in self.selected)
            for tile in self.tiles[len(self.items):]:
                tile.hide()
        finally:
            self._busy = False

    def _toggled(self, tile: _Tile, on: bool) -> None:
        if self._busy or not tile.path:
            return
        (self.selected.add if on else self.selected.discard)(tile.path)
        self.on_change()

    def select(self, paths) -> None:
        """Add paths to the selection and redraw."""
        self.selected.update(map(str, paths))
        self.show(self.items)
        self.on_change()

    def select_shown(self) -> None:
        """Select every item on screen."""
        self.select(item.path for item in self.items)

    def clear(self) -> None:
        """Empty the selection and redraw."""
        self.selected.clear()
        self.show(self.items)
        self.on_change()
