"""Bulk identification: streaming batch inference over an inbox into a results table.

`run(workspace, generation, inbox)` predicts every file under a folder (any depth)
and writes `WORKSPACE/bulkid/<name>/results.parquet`, one row per file; the
filters are plain pandas functions over that table, each returning a subset with
the same columns, so they combine by nesting calls.

One idea per module:

- `engine`: files in, rows out (decoding, the model, the scores; resumable runs).
- `results`: the run folder and its table (parts, merging, recovery, reading).
- `filters`: the pandas filters the notebooks and the widget call.
- `view`: a run opened lazily (`open_view`): small columns as arrays, rows read a
  page at a time, "more like this" through a nearest-neighbour index.
- `reader`: the view's files, opened once and read by row position through those
  handles, whatever the run does to the files afterwards.

The names below are the package's public calls; import them from here.
"""
from .engine import (LINK_ERROR, SPECIAL_ERROR, ImageFiles, identify_unknown, list_files,
                     normalise, run)
from .filters import (DEFAULT_MASS_REMOVAL_SCORE, FALLBACK_MASS_REMOVAL_SCORE,
                      MASS_REMOVAL_SCORES, check_generation, combine, errors, filed_unknown,
                      lookalikes, low_count_classes, lowest_scores, mass_removal_score,
                      more_like_this, synthetic_reliant)
from .results import RESULT_COLUMNS, SCHEMA, load_results, runs
from .view import ResultsView, open_view

__all__ = [
    "DEFAULT_MASS_REMOVAL_SCORE", "FALLBACK_MASS_REMOVAL_SCORE", "LINK_ERROR",
    "MASS_REMOVAL_SCORES", "RESULT_COLUMNS", "SCHEMA", "SPECIAL_ERROR", "ImageFiles",
    "check_generation", "combine", "errors", "filed_unknown", "identify_unknown", "list_files",
    "load_results", "lookalikes", "low_count_classes", "lowest_scores", "mass_removal_score",
    "more_like_this", "normalise", "open_view", "ResultsView", "run", "runs",
    "synthetic_reliant",
]
