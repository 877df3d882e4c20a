"""Curation: find problems in the library and fix them without losing anything.

Finding: unreadable files, exact duplicates (same bytes), near duplicates
(perceptual hashes compared by Hamming distance with multi-index hashing, never
an N x N matrix; optionally embedding similarity from a generation), leakage of
duplicates across splits, EXIF orientation tags that disagree with the pixels,
and how much of each class is staged or synthetic.

Fixing, and where each fact lives (every action is one journal row; `undo`
reverses any of them):

- Rotation: the original is moved to `_trash/` (a journal "trash" row) and the
  rotated pixels are written as a new file at its path (a "rotate" row naming
  that trash row). Undo trashes the rotated file and moves the original back.
- Provenance (real, staged, synthetic): the `source` column of
  `library/_meta.csv`, rewritten atomically ("source" rows).
- Discard flags and split pins: `library/_flags.csv` (path, discard, reason,
  pin), rewritten atomically ("discard", "undiscard", "pin", "unpin" rows);
  `library.read_flags` reads it and `splits.split_manifest` drops discarded
  images and puts pinned ones in their pinned split.

Table edits record the old and new values of every changed row, so an undo
restores exactly what was there. Flags and provenance are keyed by the path in
the library, like `_meta.csv`.
"""
from __future__ import annotations

import json

import pandas as pd

from .. import journal
from ..workspace import Workspace
from .duplicates import (PAIR_COLUMNS, embedding_pairs, exact_duplicates, hamming_pairs,
                         hash_codes, near_duplicate_pairs, near_duplicates, suggest_keeper,
                         unreadable)
from .edits import (CHECKED, checked_paths, discard, locked, mark_checked, pin, provenance,
                    set_source, undiscard, undo_table, unpin)
from .leakage import current_splits, leakage, pin_leaking_groups
from .rewrites import (MERGE, RELABEL, ROTATIONS, exif_disagreements, merge_classes, relabel,
                       rotate, strip_orientation, undo_moves, undo_rotate)

__all__ = ["CHECKED", "CURATION_ACTIONS", "MERGE", "PAIR_COLUMNS", "RELABEL", "ROTATIONS",
           "checked_paths", "current_splits", "discard", "embedding_pairs", "exact_duplicates",
           "exif_disagreements", "hamming_pairs", "hash_codes", "history", "leakage",
           "mark_checked", "merge_classes", "near_duplicate_pairs", "near_duplicates", "pin",
           "pin_leaking_groups", "provenance", "relabel", "rotate", "set_source",
           "strip_orientation", "suggest_keeper", "undiscard", "undo", "unpin", "unreadable"]


@locked
def undo(ws: Workspace, event_id: int) -> int:
    """Reverse any curation event (rotation, table edit, trash, copy, move).

    A merge or relabel is undone whole or not at all: while a later event still
    acts on its files (a second relabel of one of them, say), it is refused with
    nothing changed, naming the event to undo first.

    Returns:
        The id of the journal row recording the undo.

    Raises:
        ZoolibError: no such event, it was already undone, or (a merge or relabel)
            it could not be undone whole.
    """
    row = journal.undoable_event(ws, event_id)
    details = json.loads(row["details"] or "{}")
    if row["action"] == "rotate":
        return undo_rotate(ws, row, details)
    if row["action"] in (MERGE, RELABEL):
        return undo_moves(ws, row, details)
    if row["action"] == CHECKED:  # a mark only: the undo row is the whole undo
        return journal.record(ws, "undo", path=row["path"], undoes=int(row["id"]))
    if "changes" in details:
        return undo_table(ws, row, details)
    return journal.undo(ws, event_id)


CURATION_ACTIONS = ("rotate", "discard", "undiscard", "pin", "unpin", "source", "trash", "merge",
                    "relabel", "checked")


def history(ws: Workspace, columns=None) -> pd.DataFrame:
    """Curation events of the journal, newest first, with whether each was undone
    (`columns` of them only, as `journal.read` names them; default all)."""
    return journal.read(ws, actions=CURATION_ACTIONS, columns=columns, newest_first=True)
