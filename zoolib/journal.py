"""The workspace journal: an append-only SQLite log of everything done to user files.

Several processes (a notebook, a widget, a server) may write at once: the
database runs in WAL mode with a busy timeout, and each event is one row in its
own transaction. Rows are never updated or deleted; an undo is a new row that
names the row it reverses.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .workspace import Workspace, ZoolibError

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
"""


def connect(ws: Workspace) -> sqlite3.Connection:
    """Open the workspace database (created on first use) in WAL mode."""
    con = sqlite3.connect(ws.journal_db, timeout=30, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA busy_timeout=30000")
    con.executescript(_SCHEMA)
    return con


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


def read(ws: Workspace, action: str | None = None) -> pd.DataFrame:
    """All journal rows (optionally of one action), oldest first, with an
    `undone` column telling whether a later row reversed each one."""
    if not ws.journal_db.exists():
        cols = ["id", "time", "action", "path", "dest", "label", "details", "undoes", "undone"]
        return pd.DataFrame(columns=cols)
    with closing(connect(ws)) as con:
        rows = pd.read_sql_query("SELECT * FROM journal ORDER BY id", con)
    rows["undone"] = rows["id"].isin(set(rows["undoes"].dropna().astype(int)))
    return rows if action is None else rows[rows["action"] == action].reset_index(drop=True)


def _rel(ws: Workspace, path: Path) -> str:
    return path.resolve().relative_to(ws.root).as_posix()


def _free_path(path: Path) -> Path:
    """`path`, or `path` with a counter added if it exists: nothing is overwritten."""
    n, candidate = 1, path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}~{n}{path.suffix}")
        n += 1
    return candidate


def trash(ws: Workspace, path: str | Path, reason: str = "") -> int:
    """Move a workspace file to `_trash/` (same relative path) and journal it."""
    src = (ws.root / path).resolve()
    if not src.is_file() or ws.root not in src.parents:
        raise ZoolibError(f"{path} is not a file inside workspace {ws.root}")
    origin = _rel(ws, src)
    dest = _free_path(ws.trash / origin)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, dest)
    return record(ws, "trash", origin, _rel(ws, dest), reason=reason)


def copy_into(ws: Workspace, path: str | Path, folder: Path, action: str = "copy",
              label: str | None = None, move: bool = False) -> int:
    """Copy (or move) a file into a workspace folder, never overwriting; journaled."""
    src = Path(path).resolve()
    if not src.is_file():
        raise ZoolibError(f"{path} is not a file")
    folder.mkdir(parents=True, exist_ok=True)
    dest = _free_path(folder / src.name)
    (shutil.move if move else shutil.copy2)(src, dest)
    origin = _rel(ws, src) if ws.root in src.parents else str(src)
    return record(ws, action, origin, _rel(ws, dest), label=label, moved=move)


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

    Raises:
        ZoolibError: no such event, already undone, or its files are gone.
    """
    row = undoable_event(ws, event_id)
    dest = ws.root / row["dest"] if row["dest"] else None
    if dest is None or not dest.exists():
        raise ZoolibError(f"cannot undo event {event_id} ({row['action']}): {dest} is missing")
    moved = row["action"] == "trash" or json.loads(row["details"] or "{}").get("moved")
    if moved:
        back = ws.root / row["path"] if not Path(row["path"]).is_absolute() else Path(row["path"])
        back = _free_path(back)
        back.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(dest, back)
    else:  # a copy: the undo removes the copy, into the trash so nothing is lost
        back = _free_path(ws.trash / dest.relative_to(ws.root))
        back.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(dest, back)
    return record(ws, "undo", row["dest"], _rel(ws, back) if ws.root in back.resolve().parents
                  else str(back), undoes=int(event_id))
