"""What the bulk-identification buttons do, as plain journaled functions.

Add to the library (copied by default), discard (moved to the workspace's
`_trash/`), undo, the current mark of every file read back from the journal, and
CSV exports. The widget only calls these, so every click is one or more rows in
the workspace journal and the marks survive re-filtering and kernel restarts:
`marks(ws)` derives them from the journal each time.

A file is identified in the journal as journal.py does it: its path relative to
the workspace root when inside it, else its absolute path.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from . import journal
from .workspace import (Workspace, ZoolibError, check_class_name, check_user_file, lock,
                        write_atomic)

ADD = "add_to_library"  # journal action of an image copied (or moved) into a class
DISCARD = "trash"  # the journal's own trash action, so curation discards count too
BATCH = "bulk_action"  # one row per button click, listing the events it wrote
EXPORT = "export_selection"
ADDED, DISCARDED = "added", "discarded"
MARK_COLUMNS = ["path", "key", "status", "label", "dest", "event"]
# Columns of an export: the results without the embedding (not CSV material).
_LIST_COLUMNS = ("top5", "top5_prob")


def file_key(ws: Workspace, path: str | Path) -> str:
    """How the journal names a file: relative to the workspace root, else absolute
    (a symbolic link names itself, never its target)."""
    return journal._rel(ws, Path(path))


def _abs(ws: Workspace, key: str) -> str:
    return key if Path(key).is_absolute() else str(ws.root / key)


def marks(ws: Workspace) -> pd.DataFrame:
    """The current mark of every file an add or discard touched (undone events ignored).

    The latest live event of a file wins, so an undo brings back the mark below it.

    Returns:
        One row per file: path (absolute), key (as journaled), status ("added" or
        "discarded"), label (class for added files), dest (where the file or its
        copy is now, relative to the workspace) and event (journal id).
    """
    rows = journal.read(ws)
    live = rows[rows["action"].isin([ADD, DISCARD]) & ~rows["undone"].astype(bool)]
    live = live.drop_duplicates("path", keep="last")
    out = pd.DataFrame({
        "path": [_abs(ws, k) for k in live["path"]], "key": live["path"].tolist(),
        "status": np.where(live["action"] == ADD, ADDED, DISCARDED).tolist(),
        "label": live["label"].fillna("").tolist(), "dest": live["dest"].fillna("").tolist(),
        "event": live["id"].astype(int).tolist()}, columns=MARK_COLUMNS)
    return out.reset_index(drop=True)


def status_of(paths: pd.Series, current: pd.DataFrame) -> pd.Series:
    """Mark per path ("" for unmarked), aligned with `paths` (absolute path strings)."""
    lookup = dict(zip(current["path"], current["status"]))
    return paths.map(lookup).fillna("").astype(str)


def _files(ws: Workspace, paths: Iterable[str | Path]) -> list[str]:
    keys = list(dict.fromkeys(file_key(ws, p) for p in paths))  # ordered, no repeats
    if not keys:
        raise ZoolibError("no image selected")
    return keys


def _batch(ws: Workspace, kind: str, todo: list[str], act, **details) -> list[int]:
    """Run `act(key) -> event id` on each file, then journal the batch row.

    The files were all checked before the first one moves. If one still fails
    (a disk error), the batch row is written for the files already done, so
    undo reverses exactly those, and the error is raised.
    """
    events: list[int] = []
    try:
        for key in todo:
            events.append(act(key))
    finally:
        if events:
            journal.record(ws, BATCH, kind=kind, events=events, complete=len(events) == len(todo),
                           **details)
    return events


def _check(ws: Workspace, key: str, links: bool) -> None:
    """Refuse a file actions may not touch, before any file of the batch moves."""
    check_user_file(ws, _abs(ws, key), links=links)


def add_to_library(ws: Workspace, paths: Iterable[str | Path], cls: str, move: bool = False,
                   run: str = "") -> list[int]:
    """Copy (or move) images into `library/<cls>/`, never overwriting; journaled.

    Idempotent: files already added to the same class are skipped, so a repeated
    click (or two processes adding the same files) gives one copy. A file added
    to another class must be undone first. All files are checked before the
    first is copied, under the workspace lock.

    Args:
        ws: the workspace.
        paths: image files (absolute, or relative to the workspace root): inbox
            or library images, or files outside the workspace; never a symbolic
            link or a workspace internal.
        cls: the class name; a new name creates the class folder.
        move: move instead of copy (the inbox file then leaves the inbox).
        run: the bulk-identification run the images came from, for the journal.

    Returns:
        The journal ids of the new add events.

    Raises:
        ZoolibError: the class name is not a plain folder name (or differs from
            an existing class only by case), nothing is selected, a file is
            missing, a link, a workspace internal, discarded or added to another class.
    """
    cls = check_class_name(cls, ws)
    keys = _files(ws, paths)
    with lock(ws):
        journal.recover(ws)
        current = marks(ws).set_index("key")
        todo = []
        for key in keys:
            if key in current.index:
                mark = current.loc[key]
                if mark["status"] == ADDED and mark["label"] == cls:
                    continue
                raise ZoolibError(f"{key} is already {mark['status']}"
                                  f"{' to ' + mark['label'] if mark['label'] else ''}: undo that "
                                  "first")
            _check(ws, key, links=False)
            todo.append(key)
        return _batch(ws, ADD, todo, lambda k: journal.copy_into(
            ws, _abs(ws, k), ws.library / cls, action=ADD, label=cls, move=move),
            label=cls, run=run, moved=move)


def discard(ws: Workspace, paths: Iterable[str | Path], reason: str = "discarded in bulk "
            "identification", run: str = "") -> list[int]:
    """Move images to the workspace's `_trash/` (journaled); already discarded ones are skipped.

    Files outside the workspace (an external inbox) go to `_trash/external/` under
    their absolute path, so an undo can put them back. A symbolic link is moved
    itself; its target is never touched. All files are checked before the first
    moves, under the workspace lock, so two processes discarding the same files
    move each once.

    Returns:
        The journal ids of the new trash events.

    Raises:
        ZoolibError: nothing selected, a file is missing, or a file is not an image
            of the library's class folders, the inbox or an external inbox (the
            database, models, splits and side tables are refused).
    """
    keys = _files(ws, paths)
    with lock(ws):
        journal.recover(ws)
        current = marks(ws).set_index("key")
        todo = [k for k in keys if not (k in current.index
                                        and current.loc[k, "status"] == DISCARDED)]
        for key in todo:
            _check(ws, key, links=True)
        return _batch(ws, DISCARD, todo, lambda k: journal.trash(ws, k, reason=reason)
                      if not Path(k).is_absolute() else _trash_external(ws, Path(k), reason),
                      run=run)


def _trash_external(ws: Workspace, src: Path, reason: str) -> int:
    """journal.trash for a file outside the workspace (journal.trash refuses those)."""
    dest = journal._free_path(ws.trash / "external" / src.relative_to(src.anchor))
    return journal.move_journaled(ws, DISCARD, src, dest, reason=reason)


def undo_last(ws: Workspace) -> list[int]:
    """Undo the latest click (batch of adds or discards) that still has live events.

    Returns:
        The journal ids of the undo events (empty when there is nothing to undo).
    """
    with lock(ws):
        journal.recover(ws)
        rows = journal.read(ws)
        undone = set(rows.loc[rows["undone"].astype(bool), "id"].astype(int))
        for details in reversed(rows.loc[rows["action"] == BATCH, "details"].tolist()):
            live = [e for e in json.loads(details)["events"] if e not in undone]
            if live:
                return [journal.undo(ws, e) for e in reversed(live)]
        return []


def undo_files(ws: Workspace, paths: Iterable[str | Path]) -> list[int]:
    """Undo the current mark (latest live add or discard) of each given file.

    Returns:
        The journal ids of the undo events; unmarked files are skipped.
    """
    with lock(ws):
        journal.recover(ws)
        current = marks(ws).set_index("key")
        keys = [k for k in _files(ws, paths) if k in current.index]
        return [journal.undo(ws, int(current.loc[k, "event"])) for k in keys]


def export_csv(rows: pd.DataFrame, path: str | Path) -> Path:
    """Write result rows as CSV (no embedding; top-5 lists joined by "|"), atomically.

    Returns:
        The CSV path.
    """
    out = rows.drop(columns=["embedding"], errors="ignore").copy()
    for col in _LIST_COLUMNS:
        if col in out.columns:
            out[col] = out[col].map(_join)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, write=lambda p: out.to_csv(p, index=False))
    return path


def _join(values) -> str:
    if values is None or (isinstance(values, float) and np.isnan(values)):
        return ""
    return "|".join(f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v) for v in values)


def export_selection(ws: Workspace, results: pd.DataFrame, paths: Iterable[str | Path],
                     path: str | Path, run: str = "") -> Path:
    """Export the selected result rows, with their current marks, as CSV; journaled.

    Args:
        ws: the workspace.
        results: the bulk-identification results (column `path`, absolute).
        paths: the selected files.
        path: the CSV to write (relative paths are taken from the workspace root).
        run: the run name, for the journal.

    Raises:
        ZoolibError: nothing selected, or a selected file is not in the results.
    """
    wanted = [_abs(ws, k) for k in _files(ws, paths)]
    rows = results[results["path"].isin(wanted)]
    missing = sorted(set(wanted) - set(rows["path"]))
    if missing:
        raise ZoolibError(f"{len(missing)} selected file(s) not in the results, e.g. {missing[0]}")
    current = marks(ws)
    rows = rows.assign(status=status_of(rows["path"], current),
                       label=rows["path"].map(dict(zip(current["path"], current["label"])))
                       .fillna(""))
    target = Path(path) if Path(path).is_absolute() else ws.root / path
    out = export_csv(rows, target)
    journal.record(ws, EXPORT, dest=file_key(ws, out), rows=len(rows), run=run)
    return out


def export_filters(results: pd.DataFrame, subsets: dict[str, pd.Series], folder: str | Path
                   ) -> dict[str, int]:
    """Write one CSV per filter (`<folder>/<name>.csv`), the batch answer to the widget.

    Args:
        results: the bulk-identification results.
        subsets: filter name -> boolean mask aligned with `results`.
        folder: the report folder.

    Returns:
        Rows written per filter.
    """
    counts = {}
    for name, mask in subsets.items():
        export_csv(results[mask], Path(folder) / f"{name}.csv")
        counts[name] = int(mask.sum())
    return counts
