"""The transaction log: one row per served prediction, one per manual evaluation.

Both tables live in the workspace database (`zoo.sqlite`, next to the journal),
in WAL mode with a busy timeout, so a server, notebooks and the review widget
may write at once. Rows are appended, never updated: a second review of the same
transaction is a new evaluation row, and the newest one counts.

A write that fails raises `TransactionLogError`: a prediction whose row cannot
be stored is an error for the caller, never a silent gap in the log.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from . import db
from .workspace import UNKNOWN, Workspace, ZoolibError, check_class_name

_SCHEMA = """
CREATE TABLE IF NOT EXISTS transactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    generation TEXT NOT NULL,
    image_hash TEXT NOT NULL,
    source TEXT NOT NULL,
    predicted TEXT NOT NULL,
    confidence REAL NOT NULL,
    top5 TEXT NOT NULL,
    latency_ms REAL NOT NULL,
    image TEXT
);
CREATE INDEX IF NOT EXISTS transactions_time ON transactions(time);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_id INTEGER NOT NULL REFERENCES transactions(id),
    time TEXT NOT NULL,
    correct INTEGER NOT NULL,
    true_class TEXT,
    reviewer TEXT NOT NULL,
    notes TEXT
);
CREATE INDEX IF NOT EXISTS evaluations_tx ON evaluations(transaction_id);
"""
TX_COLUMNS = ["id", "time", "generation", "image_hash", "source", "predicted", "confidence",
              "top5", "latency_ms", "image"]
EVAL_COLUMNS = ["id", "transaction_id", "time", "correct", "true_class", "reviewer", "notes"]
# Columns the joined view adds to each transaction (from its newest evaluation).
JOINED_EXTRA = ["evaluated", "correct", "true_class", "reviewer", "evaluated_at"]


class TransactionLogError(RuntimeError):
    """The transaction log could not be written (locked, read-only, disk full...)."""


class UnknownTransactionError(ZoolibError):
    """An evaluation names a transaction id the log does not hold."""


def served_images(ws: Workspace) -> Path:
    """Where served images are kept, by content hash, for later review."""
    return ws.served


def now() -> datetime:
    """The current time in UTC (the log's clock)."""
    return datetime.now(timezone.utc)


def connect(ws: Workspace, timeout: float = 30.0, check_same_thread: bool = True
            ) -> sqlite3.Connection:
    """Open the workspace database with the log tables, in WAL mode.

    Args:
        ws: the workspace.
        timeout: seconds a write waits for a lock held by another writer.
        check_same_thread: False for a connection shared by threads under a lock.

    Raises:
        TransactionLogError: the database cannot be opened or set up.
    """
    try:
        return db.connect(ws, _SCHEMA, timeout, check_same_thread)
    except sqlite3.Error as exc:
        raise TransactionLogError(f"cannot open the transaction log {ws.journal_db}: {exc}"
                                  ) from exc


class Writer:
    """One open connection that appends transaction rows, safe to share by threads."""

    def __init__(self, ws: Workspace, timeout: float = 30.0):
        self.ws = ws
        self._con = connect(ws, timeout, check_same_thread=False)
        self._lock = threading.Lock()

    def append(self, row: dict) -> int:
        """Insert one transaction row (keys: TX_COLUMNS without id) and return its id.

        Raises:
            TransactionLogError: the row was not stored.
        """
        values = [row["time"], row["generation"], row["image_hash"], row["source"],
                  row["predicted"], float(row["confidence"]), json.dumps(row["top5"]),
                  float(row["latency_ms"]), row.get("image")]
        try:
            with self._lock:
                cur = self._con.execute(
                    "INSERT INTO transactions (time, generation, image_hash, source, predicted,"
                    " confidence, top5, latency_ms, image) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    values)
                return int(cur.lastrowid)
        except sqlite3.Error as exc:
            raise TransactionLogError(
                f"prediction not logged to {self.ws.journal_db}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._con.close()


def _iso(when: datetime | str | None) -> str:
    if when is None:
        return now().isoformat()
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    if when.tzinfo is None:
        raise ZoolibError(f"evaluation time {when} has no time zone: give UTC or an offset")
    return when.astimezone(timezone.utc).isoformat()


def _check_true_class(true_class: str | None) -> str | None:
    if true_class is None or true_class == "":
        return None
    return true_class if true_class == UNKNOWN else check_class_name(true_class)


def record_evaluation(ws: Workspace, transaction_id: int, reviewer: str,
                      correct: bool | None = None, true_class: str | None = None,
                      time: datetime | str | None = None, notes: str = "") -> int:
    """Record a person's verdict on a served prediction and return the row id.

    Args:
        ws: the workspace.
        transaction_id: the transaction reviewed (any earlier prediction).
        reviewer: who reviewed it.
        correct: whether the prediction was right; derived from `true_class`
            when None.
        true_class: what the image really shows (a class name, "Unknown", or a
            name the model does not know).
        time: when it was reviewed (UTC; now by default).
        notes: free text.

    Raises:
        ZoolibError: unknown transaction, no reviewer, bad class name, neither
            `correct` nor `true_class` given, or the two disagree.
    """
    if not str(reviewer or "").strip():
        raise ZoolibError("an evaluation needs a reviewer name")
    true_class = _check_true_class(true_class)
    if correct is None and true_class is None:
        raise ZoolibError("an evaluation needs `correct` or `true_class`")
    with closing(connect(ws)) as con:
        hit = con.execute("SELECT predicted FROM transactions WHERE id = ?",
                          (int(transaction_id),)).fetchone()
        if hit is None:
            raise UnknownTransactionError(
                f"transaction {transaction_id} does not exist in {ws.journal_db}")
        if correct is None:
            correct = true_class == hit[0]
        elif true_class is not None and bool(correct) != (true_class == hit[0]):
            raise ZoolibError(f"transaction {transaction_id} predicted {hit[0]!r}: "
                              f"correct={correct} contradicts true_class={true_class!r}")
        try:
            cur = con.execute(
                "INSERT INTO evaluations (transaction_id, time, correct, true_class, reviewer,"
                " notes) VALUES (?, ?, ?, ?, ?, ?)",
                (int(transaction_id), _iso(time), int(bool(correct)), true_class,
                 str(reviewer).strip(), notes))
        except sqlite3.Error as exc:
            raise TransactionLogError(f"evaluation not stored in {ws.journal_db}: {exc}") from exc
        return int(cur.lastrowid)


def _read(ws: Workspace, sql: str, columns: list[str], params=()) -> pd.DataFrame:
    if not ws.journal_db.exists():
        return pd.DataFrame(columns=columns)
    with closing(connect(ws)) as con:
        return pd.read_sql_query(sql, con, params=params)


def transactions(ws: Workspace, since: datetime | str | None = None) -> pd.DataFrame:
    """Transaction rows, oldest first, `time` as UTC timestamps, `top5` decoded."""
    where, params = ("WHERE time >= ?", (_iso(since),)) if since else ("", ())
    rows = _read(ws, f"SELECT * FROM transactions {where} ORDER BY id", TX_COLUMNS, params)
    rows["time"] = pd.to_datetime(rows["time"], utc=True, format="ISO8601")
    rows["top5"] = rows["top5"].map(json.loads)
    return rows


def evaluations(ws: Workspace) -> pd.DataFrame:
    """Evaluation rows, oldest first, `time` as UTC timestamps, `correct` as bool."""
    rows = _read(ws, "SELECT * FROM evaluations ORDER BY id", EVAL_COLUMNS)
    rows["time"] = pd.to_datetime(rows["time"], utc=True, format="ISO8601")
    rows["correct"] = rows["correct"].astype(bool)
    return rows


def joined(ws: Workspace, since: datetime | str | None = None) -> pd.DataFrame:
    """Transactions with their newest evaluation attached (one row per transaction).

    Adds `evaluated` (bool), `correct` (True/False, NA when not evaluated),
    `true_class`, `reviewer` and `evaluated_at`.
    """
    tx = transactions(ws, since)
    ev = evaluations(ws).sort_values("id").drop_duplicates("transaction_id", keep="last")
    ev = ev.rename(columns={"id": "evaluation_id", "time": "evaluated_at"})
    out = tx.merge(ev[["transaction_id", "correct", "true_class", "reviewer", "evaluated_at"]],
                   how="left", left_on="id", right_on="transaction_id").drop(
        columns="transaction_id")
    out["evaluated"] = out["evaluated_at"].notna()
    out["correct"] = out["correct"].astype("boolean")
    return out


def pick_for_review(ws: Workspace, n: int = 12, mode: str = "recent", seed: int = 0
                    ) -> pd.DataFrame:
    """Transactions to show a reviewer.

    Args:
        ws: the workspace.
        n: how many.
        mode: "recent" (newest first), "sample" (random) or "unreviewed"
            (newest not yet evaluated).
        seed: for "sample".

    Raises:
        ZoolibError: unknown mode.
    """
    rows = joined(ws)
    if mode == "recent":
        return rows.sort_values("id", ascending=False).head(n).reset_index(drop=True)
    if mode == "unreviewed":
        rows = rows[~rows["evaluated"]]
        return rows.sort_values("id", ascending=False).head(n).reset_index(drop=True)
    if mode == "sample":
        return rows.sample(min(n, len(rows)), random_state=seed).reset_index(drop=True)
    raise ZoolibError(f"review mode {mode!r} is not one of recent, sample, unreviewed")
