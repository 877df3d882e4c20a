"""The nearest-neighbour index of a results table's embeddings ("more like this").

A derived file beside the merged results (`index_dir`: index.faiss and index.json,
the files it covers, each with its row count, byte size and the part numbers it
holds): loaded and extended by the files added since, or built again when the
listing it was built from is not a prefix of today's. A file set aside and
identified again has the same name and perhaps the same row count, but new part
numbers and another size, so an index of its old rows is never reused. An index
that cannot be read (cut short, garbage, a bad index.json) is built again, saying so.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .. import ann
from ..workspace import write_atomic

if TYPE_CHECKING:
    from .view import ResultsView


def load_or_build(view: ResultsView) -> ann.Index:
    """The view's index: loaded from `index_dir` and extended by the files added since,
    or built; saved back when the view is over merged files only."""
    files = view._files
    if view._index_dir is None or files is None:
        return ann.Index.build(view._embeddings, len(view), view.dim, compressed=True)
    listing = files.listing  # of the files as opened: the run may have changed them since
    meta_path, index_path = view._index_dir / "index.json", view._index_dir / "index.faiss"
    index, covered = _saved(meta_path, index_path, listing)
    if index is None:
        index = ann.Index.build(view._embeddings, len(view), view.dim, compressed=True)
    else:
        for batch in files.embeddings(covered):
            index.add(batch)
    if not any(e[0].startswith("part-") for e in listing) and covered < len(listing):
        try:
            view._index_dir.mkdir(exist_ok=True)
            write_atomic(index_path, write=index.save)
            write_atomic(meta_path, json.dumps({"files": listing}))
        except OSError as exc:  # a read-only copy of the workspace: the index still works
            warnings.warn(f"the index of {view._index_dir.parent} was not saved ({exc}); "
                          "it is built again next time", stacklevel=2)
    return index


def _saved(meta_path: Path, index_path: Path, listing: list) -> tuple[ann.Index | None, int]:
    """The saved index and how many files of `listing` it covers, or (None, 0)."""
    if not (meta_path.exists() and index_path.exists()):
        return None, 0
    try:
        saved = json.loads(meta_path.read_text())["files"]
        if saved != listing[:len(saved)]:
            return None, 0
        return ann.Index.load(index_path), len(saved)
    except Exception as exc:  # noqa: BLE001 - faiss and json raise many kinds; rebuild
        warnings.warn(f"the index in {index_path.parent} cannot be read ({type(exc).__name__}: "
                      f"{exc}); building it again", stacklevel=3)
        return None, 0
