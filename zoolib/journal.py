"""The workspace journal: an append-only SQLite log of everything done to user files.

Several processes (a notebook, a widget, a server) may write at once: the
database runs in WAL mode with a busy timeout, and each event is one row in its
own transaction. Rows are never updated or deleted; an undo is a new row that
names the row it reverses.
"""
from __future__ import annotations

import errno
import json
import numbers
import os
import shutil
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from . import db
from .workspace import (Workspace, ZoolibError, check_user_file, cut_stem, lexical, name_limit,
                        temp_path, user_area, write_atomic)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    action TEXT NOT NULL,
    path TEXT,
    dest TEXT,
    label TEXT,
    details TEXT,
    undoes INTEGER REFERENCES journal(id)
);
CREATE INDEX IF NOT EXISTS journal_undoes ON journal (undoes);
CREATE INDEX IF NOT EXISTS journal_action ON journal (action, id);
"""
# The indexes serve `read`: `undone` looks a row up by the row that undoes it, and a
# page of some actions, newest first, walks (action, id) instead of sorting them all.
COLUMNS = ("id", "time", "action", "path", "dest", "label", "details", "undoes")
UNDONE = "undone"  # computed by `read`: whether a later row reversed this one


def connect(ws: Workspace) -> sqlite3.Connection:
    """Open the workspace database (created on first use) with the journal table."""
    return db.connect(ws, _SCHEMA)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def record(ws: Workspace, action: str, path: str | None = None, dest: str | None = None,
           label: str | None = None, undoes: int | None = None, **details) -> int:
    """Append one event and return its id.

    Args:
        ws: the workspace.
        action: what happened ("trash", "copy", "rotate", "mark", ...).
        path: the file acted on, relative to the workspace root.
        dest: where it went (relative), for moves and copies.
        label: a class name involved, if any.
        undoes: id of the event this one reverses.
        **details: anything else, stored as JSON.
    """
    with closing(connect(ws)) as con:
        cur = con.execute(
            "INSERT INTO journal (time, action, path, dest, label, details, undoes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (_now(), action, path, dest, label, json.dumps(details, default=str), undoes))
        return int(cur.lastrowid)


def read(ws: Workspace, action: str | None = None, *, columns=None, ids=None, actions=None,
         limit: int | None = None, offset: int = 0, newest_first: bool = False) -> pd.DataFrame:
    """Journal rows, oldest first, with an `undone` column telling whether a later
    row reversed each one; filtered, paged and narrowed in SQL.

    `undone` is computed over the whole journal, whatever the filters and the page.

    Args:
        ws: the workspace.
        action: only rows of this action (as `actions=[action]`).
        columns: the columns to return, in this order (COLUMNS, the table's own
            columns, and "undone"); default all, "undone" last.
        ids: only rows with these ids (any number).
        actions: only rows of these actions.
        limit: at most this many rows (None: all).
        offset: skip this many rows first (of the filtered, ordered rows).
        newest_first: order by id descending instead of ascending.

    Returns:
        One row per event, index 0..n-1.

    Raises:
        ValueError: an unknown column (named), `action` and `actions` both
            given, or a limit or offset that is not a non-negative integer.

    Example:
        >>> read(ws, actions=["trash"], limit=2, newest_first=True)["id"].tolist()
        [9, 4]
    """
    where, params = _where(action, actions, ids)
    params += [-1 if limit is None else _non_negative("limit", limit),
               _non_negative("offset", offset)]  # SQLite: LIMIT -1 is no limit
    if not ws.journal_db.exists():
        return pd.DataFrame(columns=_checked(columns, COLUMNS))
    with closing(connect(ws)) as con:
        table = tuple(r[1] for r in con.execute("PRAGMA table_info(journal)"))
        columns = _checked(columns, table)
        # The names were checked against the table, so quoting them is safe; every
        # value goes in as a parameter.
        fields = ", ".join(f'"{c}"' if c != UNDONE else _UNDONE_SQL for c in columns)
        order = "DESC" if newest_first else "ASC"
        rows = pd.read_sql_query(f"SELECT {fields} FROM journal{where} ORDER BY id {order} "
                                 "LIMIT ? OFFSET ?", con, params=params)
    if UNDONE in rows.columns:
        rows[UNDONE] = rows[UNDONE].astype(bool)
    if "undoes" in rows.columns:  # NaN where none, as on the whole table, whatever the page
        rows["undoes"] = rows["undoes"].astype("float64")
    return rows


_UNDONE_SQL = "EXISTS (SELECT 1 FROM journal AS u WHERE u.undoes = journal.id) AS undone"


def _checked(columns, table: tuple[str, ...]) -> list[str]:
    """The columns asked for (default: the table's, then undone), each one known.

    Raises:
        ValueError: a column the table lacks, named with the ones it has.
    """
    if columns is None:
        return [*table, UNDONE]
    columns = [columns] if isinstance(columns, str) else list(columns)
    for c in columns:
        if c not in table and c != UNDONE:
            raise ValueError(f"journal has no column {c!r}; it has "
                             f"{', '.join((*table, UNDONE))}")
    return columns


def _non_negative(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def dest(ws: Workspace, event: int) -> str:
    """Where event `event` put its file (its `dest`), read by id, not the whole journal.

    Raises:
        ZoolibError: no event of that id.
    """
    rows = read(ws, ids=[event], columns=["dest"])
    if rows.empty:
        raise ZoolibError(f"the journal has no event {event}")
    return rows["dest"].iloc[0]


def count(ws: Workspace, action: str | None = None, *, actions=None, ids=None) -> int:
    """How many journal rows `read` would return with these filters and no limit.

    Raises:
        ValueError: `action` and `actions` both given.
    """
    where, params = _where(action, actions, ids)
    if not ws.journal_db.exists():
        return 0
    with closing(connect(ws)) as con:
        return int(con.execute(f"SELECT COUNT(*) FROM journal{where}", params).fetchone()[0])


def _where(action, actions, ids) -> tuple[str, list]:
    """The WHERE clause of the filters and its parameters.

    A list goes in as one JSON parameter read by `json_each`, so any number of
    ids fits (SQLite caps the number of parameters of one statement).
    """
    if action is not None and actions is not None:
        raise ValueError("give action or actions, not both")
    actions = [action] if action is not None else actions
    clauses, params = [], []
    if actions is not None:
        clauses.append("action IN (SELECT value FROM json_each(?))")
        params.append(json.dumps([str(a) for a in actions]))
    if ids is not None:
        clauses.append("id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps([int(i) for i in ids]))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _rel(ws: Workspace, path: Path) -> str:
    """How the journal names a file: relative to the workspace root when inside it
    (the file as named: a link is not followed), else its absolute path."""
    p = lexical(ws, path)
    return p.relative_to(ws.root).as_posix() if ws.root in p.parents else str(p)


def _free_path(path: Path) -> Path:
    """`path`, or `path` with a counter `~N` added if it exists: nothing is overwritten.

    The counter goes before the suffix; where the name would then pass the file
    system's limit, the stem is cut (whole characters) to make room.

    Raises:
        ZoolibError: the name does not fit even cut (`check_user_file` refuses such
            names before a batch starts: this is the last guard).
    """
    limit, n, candidate = name_limit(path.parent), 1, path
    if len(os.fsencode(path.name)) > limit:
        raise ZoolibError(f"{path}: the name is longer than the {limit} bytes its folder holds")
    while candidate.exists() or candidate.is_symlink():
        tail = f"~{n}{path.suffix}"
        stem = cut_stem(path.name, tail, limit)
        if not stem:
            raise ZoolibError(f"{path}: no counted name ({tail}) fits the {limit} bytes its "
                              "folder holds: rename it shorter")
        candidate = path.with_name(stem + tail)
        n += 1
    return candidate


def _move(src: Path, dest: Path) -> None:
    """Move a file (a link as itself) without ever leaving half a file at `dest`.

    A rename where it can (same file system: atomic); else a copy into a hidden
    sibling, renamed into place once complete, and only then the source removed.
    """
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy(src, dest)
        os.unlink(src)


def _copy(src: Path, dest: Path) -> None:
    """Copy a file's content and times to `dest`, all or nothing (`write_atomic`)."""
    write_atomic(dest, write=lambda tmp: shutil.copy2(src, tmp, follow_symlinks=False))


def move_journaled(ws: Workspace, action: str, src: Path, dest: Path, copy: bool = False,
                    **row) -> int:
    """Journal a move (or copy) first, then do it; a failed one is journaled as reversed.

    Row before file: a kill between the two leaves a row whose destination is
    missing while its source is still there, which `recover` reverses; a file
    is never moved without its row.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    event = record(ws, action, _rel(ws, src), _rel(ws, dest), row_first=True, **row)
    try:
        (_copy if copy else _move)(src, dest)
    except BaseException as exc:
        record(ws, "abandoned", _rel(ws, src), undoes=event, reason=f"{type(exc).__name__}: {exc}")
        raise
    return event


def trash(ws: Workspace, path: str | Path, reason: str = "") -> int:
    """Move a user file (a library or inbox image) to `_trash/` and journal it.

    Raises:
        ZoolibError: not a file in the library's class folders or the inbox (the
            database, models, splits and side tables are never trashed).
    """
    src = check_user_file(ws, path, areas=("library", "inbox"), links=True)
    dest = _free_path(ws.trash / src.relative_to(ws.root))
    return move_journaled(ws, "trash", src, dest, reason=reason)


def copy_into(ws: Workspace, path: str | Path, folder: Path, action: str = "copy",
              label: str | None = None, move: bool = False) -> int:
    """Copy (or move) a file into a library class folder, never overwriting; journaled.

    Raises:
        ZoolibError: the file is a workspace internal or a link, or the folder is
            not a library class folder.
    """
    src = check_user_file(ws, path)
    if user_area(ws, Path(folder) / "x") != "library":
        raise ZoolibError(f"{folder} is not a class folder of library {ws.library}")
    dest = _free_path(Path(folder) / src.name)
    return move_journaled(ws, action, src, dest, copy=not move, label=label, moved=move)


def recover(ws: Workspace) -> list[int]:
    """Reverse the rows of moves that a kill stopped before the file moved.

    A live trash, copy or move row whose destination is missing while the file
    is back at (or still at) its origin did not happen, or was undone by a
    process killed before it journaled the undo: an "abandoned" row says so.
    Unless a later standing event took a file from that destination (a relabel
    back to the first class): then the move happened and the file went on.
    Hidden partial copies left beside such destinations are removed (their
    source is intact). Library actions call this under the workspace lock.

    Returns:
        The ids of the rows written.
    """
    rows = read(ws)
    if rows.empty:
        return []
    first = rows["details"].fillna("").str.contains('"row_first": true', regex=False)
    standing = ~rows["undone"].astype(bool)
    live, standing = rows[first & standing], rows[standing]
    last_on = standing.groupby("path")["id"].max()  # the latest standing event on each file
    written = []
    for r in live.itertuples():
        dest = ws.root / r.dest
        origin = Path(r.path) if Path(r.path).is_absolute() else ws.root / r.path
        if dest.exists() or dest.is_symlink() or not (origin.exists() or origin.is_symlink()):
            continue
        if last_on.get(r.dest, -1) > r.id:  # a later event moved the file on from dest
            continue
        for pattern in (temp_path(dest, "*").name, f".{dest.name}.*.tmp"):  # new, older names
            for partial in dest.parent.glob(pattern):  # a copy cut short
                partial.unlink(missing_ok=True)
        written.append(record(ws, "abandoned", r.path, undoes=int(r.id),
                              reason="interrupted before the file moved (or after it moved "
                              "back): the file is at its origin"))
    return written


def undoable_event(ws: Workspace, event_id: int) -> pd.Series:
    """The journal row of an event that can still be undone.

    Raises:
        ZoolibError: no such event, or it was already undone.
    """
    rows = read(ws)
    match = rows[rows["id"] == event_id]
    if match.empty:
        raise ZoolibError(f"journal has no event {event_id}")
    row = match.iloc[0]
    if row["undone"]:
        raise ZoolibError(f"event {event_id} was already undone")
    return row


def undo(ws: Workspace, event_id: int) -> int:
    """Reverse a trash, copy or move event and journal the undo.

    A moved file goes back to its origin (under a new name if the origin is taken
    again); a copy goes to the trash, so nothing is lost.

    Raises:
        ZoolibError: no such event, already undone, or its files are gone.
    """
    row = undoable_event(ws, event_id)
    dest = ws.root / row["dest"] if row["dest"] else None
    if dest is None or not (dest.exists() or dest.is_symlink()):
        raise ZoolibError(f"cannot undo event {event_id} ({row['action']}): {dest} is missing")
    moved = row["action"] == "trash" or json.loads(row["details"] or "{}").get("moved")
    if moved:
        back = ws.root / row["path"] if not Path(row["path"]).is_absolute() else Path(row["path"])
    else:  # a copy: the undo removes the copy, into the trash so nothing is lost
        back = ws.trash / dest.relative_to(ws.root)
    back = _free_path(back)
    back.parent.mkdir(parents=True, exist_ok=True)
    # File first, row second: a kill between them leaves the row live with its
    # destination missing and the file at its origin, which `recover` reverses.
    _move(dest, back)
    return record(ws, "undo", row["dest"], _rel(ws, back), undoes=int(event_id))
