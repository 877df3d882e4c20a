"""The notebook views: bulk identification, curation and review, on one thumbnail grid.

Thin ipywidgets layers over tested functions (`zoolib.actions`, `curate`,
`cleaning`, `translog`); nothing in zoolib imports this package.

    from zoolib import widgets
    widgets.BulkView(ws, results, widgets.filter_sets(results, manifest))
    widgets.CurationWidget(ws, {"label issues": issues})
    widgets.ReviewWidget(ws, reviewer="anna")
    widgets.MapRegion(ws, cleaning.map_frame(ws))
"""
from .bulk import (ANY_CLASS, FILTER_TITLES, SORTS, STATUSES, BulkView, ViewState, as_view,
                   caption, filter_sets, n_pages, page_of, rare_classes, select_head,
                   select_rows)
from .curate import CurationWidget, item_paths
from .grid import Item, ThumbGrid, thumbnail
from .map import MapRegion
from .review import ReviewWidget

__all__ = ["ANY_CLASS", "FILTER_TITLES", "SORTS", "STATUSES", "BulkView", "CurationWidget",
           "Item", "MapRegion", "ReviewWidget", "ThumbGrid", "ViewState", "caption", "filter_sets",
           "as_view", "item_paths", "n_pages", "page_of", "rare_classes", "select_head",
           "select_rows",
           "thumbnail"]
