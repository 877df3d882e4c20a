"""Open the images of one region of the embedding map (`cleaning.map_frame`) in the grid.

Two range sliders choose a rectangle of the map; the figure shows it, and the
shared thumbnail grid shows the images inside it (library and inbox alike).
Nothing in zoolib imports it.
"""
from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import cleaning
from ..workspace import Workspace
from .grid import Item, ThumbGrid


def _range(values: pd.Series, description: str) -> w.FloatRangeSlider:
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    mid, quarter = (lo + hi) / 2, (hi - lo) / 8
    return w.FloatRangeSlider(value=(mid - quarter, mid + quarter), min=lo, max=hi,
                              step=(hi - lo) / 200 or 1.0, description=description,
                              continuous_update=False)


class MapRegion:
    """The map with a movable rectangle and the images inside it.

    Args:
        ws: the workspace (library paths of the map are relative to its library).
        points: `cleaning.map_frame` rows (path, where, label, x, y, mark).
        n_tiles: thumbnails shown at once.
    """

    def __init__(self, ws: Workspace, points: pd.DataFrame, n_tiles: int = 24):
        self.ws, self.points = ws, points.dropna(subset=["x", "y"]).reset_index(drop=True)
        self.x, self.y = _range(self.points["x"], "x"), _range(self.points["y"], "y")
        self.figure, self.label = w.Output(), w.Label()
        self.grid = ThumbGrid(n_tiles, 96, columns=8)
        for slider in (self.x, self.y):
            slider.observe(lambda _: self.refresh(), "value")
        self.box = w.VBox([w.HBox([self.x, self.y]), self.figure, self.label, self.grid.widget])
        self.refresh()

    def inside(self) -> pd.DataFrame:
        """The map rows inside the rectangle."""
        return cleaning.region(self.points, self.x.value, self.y.value)

    def _file(self, row) -> str:
        return str(self.ws.library / row.path) if row.where == "library" else str(row.path)

    def refresh(self) -> None:
        """Redraw the rectangle and the images inside it."""
        rows = self.inside()
        self.label.value = (f"{len(rows)} images in the region "
                            f"(showing {min(len(rows), len(self.grid.tiles))})")
        self.grid.show([Item(self._file(r), self._file(r), f"{r.label}", tip=str(r.path),
                             style="warning" if r.mark else "")
                        for r in rows.head(len(self.grid.tiles)).itertuples()])
        self.figure.clear_output(wait=True)
        with self.figure:
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.scatter(self.points["x"], self.points["y"], s=4, color="grey", alpha=0.5)
            ax.scatter(rows["x"], rows["y"], s=8, color="tab:red")
            (x0, x1), (y0, y1) = self.x.value, self.y.value
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="tab:red"))
            ax.set_xticks([]), ax.set_yticks([])
            plt.show()
            plt.close(fig)

    def show(self):
        """The widget, for display in a notebook cell."""
        return self.box

    @property
    def paths(self) -> list[str]:
        """Files inside the rectangle (library ones as absolute paths)."""
        return [self._file(r) for r in self.inside().itertuples()]
