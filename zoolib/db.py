"""The workspace database (`zoo.sqlite`): one way to open it, for every table in it.

The journal (`journal.py`) and the transaction log (`translog.py`) share the file.
Both open it here, so both get the same settings and the same retry while the new
file is switched to WAL mode: SQLite does not call its busy handler for that
switch, so processes opening a new database at the same moment got "database is
locked" from whichever opened it second.
"""
from __future__ import annotations

import sqlite3
import time

from .workspace import Workspace


def connect(ws: Workspace, schema: str, timeout: float = 30.0,
            check_same_thread: bool = True) -> sqlite3.Connection:
    """Open the workspace database in WAL mode with `schema` (idempotent SQL) applied.

    Args:
        ws: the workspace.
        schema: CREATE ... IF NOT EXISTS statements of the caller's tables.
        timeout: seconds a write waits for a lock held by another writer.
        check_same_thread: False for a connection shared by threads under a lock.

    Raises:
        sqlite3.Error: the database cannot be opened or set up (callers say which).
    """
    con = sqlite3.connect(ws.journal_db, timeout=timeout, isolation_level=None,
                          check_same_thread=check_same_thread)
    try:
        con.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        _wal(con, timeout)
        # In WAL mode NORMAL survives a killed process (the committed WAL is on disk);
        # only a power cut can lose the last commits. FULL costs a sync per row.
        con.execute("PRAGMA synchronous=NORMAL")
        con.executescript(schema)
    except BaseException:
        con.close()
        raise
    return con


def _wal(con: sqlite3.Connection, timeout: float) -> None:
    """Put the database in WAL mode (it stays so), retrying while it is locked."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
