"""Side-table edits of the library: discard flags, split pins, provenance, checked marks.

Provenance (real, staged, synthetic) is the `source` column of `library/_meta.csv`;
discard flags and split pins are `library/_flags.csv` (path, discard, reason, pin),
both rewritten atomically. Every edit is one journal row recording the old and new
values of each changed row, so an undo restores exactly what was there.
"""
from __future__ import annotations


import functools
import json
from pathlib import Path

import pandas as pd

from .. import journal, library
from ..workspace import Workspace, ZoolibError, check_user_file, lock, user_area, write_atomic

def read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    holds = library.META_HOLDS if path.name == "_meta.csv" else library.FLAGS_HOLDS
    table = (library._read_csv(path, holds) if path.exists()
             else pd.DataFrame(columns=["path"] + columns))
    for col in columns:
        if col not in table.columns:
            table[col] = ""
    return table.drop_duplicates("path", keep="last").set_index("path")


def write_table(path: Path, table: pd.DataFrame) -> None:
    write_atomic(path, table.reset_index().to_csv(index=False))


def check_paths(ws: Workspace, paths) -> list[str]:
    """Library-relative image paths, each a real file under a class folder (no link,
    no side table, nothing outside the library)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    for p in paths:
        if user_area(ws, ws.library / p) != "library":
            raise ZoolibError(f"{p!r} is not an image in a class folder of library {ws.library}")
        check_user_file(ws, ws.library / p, areas=("library",))
    return paths


def edit_table(ws: Workspace, path: Path, columns: list[str], action: str,
                updates: dict[str, dict[str, str]]) -> int:
    """Set columns of rows keyed by image path, rewrite the table, journal old and new."""
    with lock(ws):
        table = read_table(path, columns)
        # Edited as a dict of rows, then one frame: adding rows to a frame one at a
        # time copies it each time (pinning 12,000 images took 4 minutes).
        rows, changes = table.to_dict("index"), []
        for img, values in updates.items():
            old = rows.get(img)
            row = None if values is None else {**(old or {c: "" for c in table.columns}),
                                                **values}
            if row is None:
                rows.pop(img, None)
            else:
                rows[img] = row
            changes.append({"path": img, "old": old, "new": row})
        table = pd.DataFrame.from_dict(rows, orient="index", columns=table.columns)
        table.index.name = "path"
        # Row first: a kill before the rewrite leaves an undo that restores what
        # is already there, never an edit without its row.
        event = journal.record(ws, action, path=path.relative_to(ws.root).as_posix(),
                               table=path.relative_to(ws.root).as_posix(), changes=changes)
        write_table(path, table)
        return event


def undo_table(ws: Workspace, row: pd.Series, details: dict) -> int:
    path = ws.root / details["table"]
    table = read_table(path, [])
    for change in reversed(details["changes"]):
        if change["old"] is None:
            table = table.drop(index=change["path"], errors="ignore")
        else:
            table.loc[change["path"]] = pd.Series(change["old"])
    write_table(path, table.fillna(""))
    return journal.record(ws, "undo", path=row["path"], undoes=int(row["id"]))



def locked(action):
    """Run a curation action under the workspace lock (one action at a time)."""
    @functools.wraps(action)
    def run(ws: Workspace, *args, **kwargs):
        with lock(ws):
            journal.recover(ws)
            return action(ws, *args, **kwargs)
    return run



def discard(ws: Workspace, paths, reason: str) -> int:
    """Flag images as unsuitable for training: they stay in the library but are left
    out of every split. Returns the journal event id."""
    if not reason.strip():
        raise ZoolibError("discard needs a reason (e.g. 'subject too small to zoom')")
    return edit_table(ws, library.flags_csv(ws), library.FLAG_COLUMNS, "discard",
                       {p: {"discard": "1", "reason": reason} for p in check_paths(ws, paths)})


def undiscard(ws: Workspace, paths) -> int:
    """Clear the discard flag of images (they rejoin their splits)."""
    return edit_table(ws, library.flags_csv(ws), library.FLAG_COLUMNS, "undiscard",
                       {p: {"discard": "", "reason": ""} for p in check_paths(ws, paths)})


def pin(ws: Workspace, paths, split: str) -> int:
    """Pin images (a duplicate group) to one split: train, valid or test.

    Raises:
        ZoolibError: unknown split, or "benchmark" (the benchmark set is frozen).
    """
    if split not in ("train", "valid", "test"):
        raise ZoolibError(f"cannot pin to split {split!r}: use train, valid or test "
                          "(the benchmark set is frozen)")
    return edit_table(ws, library.flags_csv(ws), library.FLAG_COLUMNS, "pin",
                       {p: {"pin": split} for p in check_paths(ws, paths)})


def unpin(ws: Workspace, paths) -> int:
    """Remove split pins (images return to their content-hash split)."""
    return edit_table(ws, library.flags_csv(ws), library.FLAG_COLUMNS, "unpin",
                       {p: {"pin": ""} for p in check_paths(ws, paths)})


def set_source(ws: Workspace, paths, source: str) -> int:
    """Mark images as real, staged or synthetic in `library/_meta.csv`."""
    if source not in library.SOURCES:
        raise ZoolibError(f"source {source!r} is not one of {', '.join(library.SOURCES)}")
    return edit_table(ws, ws.meta_csv, ["source", "notes"], "source",
                       {p: {"source": source} for p in check_paths(ws, paths)})


def provenance(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per class: readable images by source and the share that is staged or synthetic.

    Returns:
        Columns label, real, staged, synthetic, total, staged_share,
        synthetic_share, reliance (staged + synthetic share); most reliant first.
    """
    ok = manifest[manifest["readable"]]
    table = pd.crosstab(ok["label"], ok["source"]).reindex(columns=list(library.SOURCES),
                                                           fill_value=0)
    table["total"] = table.sum(axis=1)
    table["staged_share"] = (table["staged"] / table["total"]).round(3)
    table["synthetic_share"] = (table["synthetic"] / table["total"]).round(3)
    table["reliance"] = (table["staged_share"] + table["synthetic_share"]).round(3)
    table.columns.name = None
    return table.reset_index().sort_values(["reliance", "label"], ascending=[False, True],
                                           ignore_index=True)



CHECKED = "checked"


def mark_checked(ws: Workspace, paths) -> int:
    """Mark library images as checked by a person: label-issue lists leave them out.

    One journal row (undoable), so the marks survive kernels and follow the journal.

    Returns:
        The journal id of the mark.
    """
    paths = check_paths(ws, paths)
    with lock(ws):
        return journal.record(ws, CHECKED, path=paths[0], paths=paths)


def checked_paths(ws: Workspace) -> set[str]:
    """Library paths marked checked (marks that were undone are not)."""
    rows = journal.read(ws, CHECKED)
    live = rows[~rows["undone"].astype(bool)]
    return {p for details in live["details"] for p in json.loads(details)["paths"]}
