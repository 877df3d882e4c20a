from contextlib import closing

import pandas as pd
import pytest

from zoolib import journal
from zoolib.workspace import ZoolibError


def test_trash_and_undo_round_trip(demo_ws):
    src = demo_ws.library / "lion" / "lion_0001.jpg"
    data = src.read_bytes()
    eid = journal.trash(demo_ws, src.relative_to(demo_ws.root), reason="blurry")
    assert not src.exists()
    assert (demo_ws.trash / "library" / "lion" / "lion_0001.jpg").read_bytes() == data
    undo_id = journal.undo(demo_ws, eid)
    assert src.read_bytes() == data
    rows = journal.read(demo_ws)
    assert rows["action"].tolist() == ["trash", "undo"]
    assert rows.set_index("id").loc[eid, "undone"] and rows.set_index("id").loc[undo_id, "undoes"] == eid
    with pytest.raises(ZoolibError, match="already undone"):
        journal.undo(demo_ws, eid)


def test_copy_never_overwrites_and_undo_keeps_the_copy_in_trash(demo_ws):
    src = next(demo_ws.inbox.rglob("*.jpg"))
    folder = demo_ws.library / "lion"
    (folder / src.name).write_bytes(b"existing")
    eid = journal.copy_into(demo_ws, src, folder, label="lion")
    assert (folder / src.name).read_bytes() == b"existing"
    copy = demo_ws.root / journal.read(demo_ws).iloc[-1]["dest"]
    assert copy.read_bytes() == src.read_bytes() and copy.name != src.name
    journal.undo(demo_ws, eid)
    assert not copy.exists() and src.exists()
    assert list(demo_ws.trash.rglob(copy.name))


def test_trash_outside_workspace_refused(demo_ws, tmp_path):
    outside = tmp_path / "x.jpg"
    outside.write_bytes(b"x")
    with pytest.raises(ZoolibError, match="outside the workspace"):
        journal.trash(demo_ws, outside)
    with pytest.raises(ZoolibError, match="no event 99"):
        journal.undo(demo_ws, 99)


def _events(ws, n=10):
    """n events: "mark" on even ids, "note" on odd ones (ids 1..n); event 3 undone by the last."""
    ids = [journal.record(ws, "mark" if i % 2 == 0 else "note", f"f{i}.jpg") for i in range(1, n)]
    ids.append(journal.record(ws, "undo", "f3.jpg", undoes=3))
    return ids


def test_read_pages_filter_and_order_in_sql(demo_ws):
    assert _events(demo_ws) == list(range(1, 11))
    page = journal.read(demo_ws, limit=3, offset=2)
    assert page["id"].tolist() == [3, 4, 5] and page.index.tolist() == [0, 1, 2]
    newest = journal.read(demo_ws, actions=["note"], limit=2, offset=1, newest_first=True)
    assert newest["id"].tolist() == [7, 5]
    assert journal.read(demo_ws, "mark", offset=3)["id"].tolist() == [8]
    assert journal.read(demo_ws, ids=[9, 2, 3, 99])["id"].tolist() == [2, 3, 9]
    assert journal.read(demo_ws, ids=range(5000))["id"].tolist() == list(range(1, 11))
    assert journal.read(demo_ws, actions=[], limit=5).empty
    # undone looks at the whole journal: the undo (id 10) is on no page of notes
    notes = journal.read(demo_ws, actions=["note"], columns=["undone", "id"])
    assert list(notes.columns) == ["undone", "id"] and notes["undone"].dtype == bool
    assert notes.set_index("id")["undone"].to_dict() == {1: False, 3: True, 5: False,
                                                          7: False, 9: False}
    assert journal.count(demo_ws) == 10 and journal.count(demo_ws, actions=["note"]) == 5
    assert journal.count(demo_ws, "mark", ids=[2, 3, 4]) == 2


def test_read_without_arguments_is_the_whole_table(demo_ws):
    _events(demo_ws)
    with closing(journal.connect(demo_ws)) as con:
        table = pd.read_sql_query("SELECT * FROM journal ORDER BY id", con)
    table["undone"] = table["id"].isin(set(table["undoes"].dropna().astype(int)))
    pd.testing.assert_frame_equal(journal.read(demo_ws), table)
    marks = table[table["action"] == "mark"].reset_index(drop=True)
    pd.testing.assert_frame_equal(journal.read(demo_ws, "mark"), marks)


def test_read_refuses_unknown_columns_and_bad_pages(demo_ws):
    for ws_has_db in (False, True):
        with pytest.raises(ValueError, match="no column 'id; DROP TABLE journal'"):
            journal.read(demo_ws, columns=["id", "id; DROP TABLE journal"])
        with pytest.raises(ValueError, match="limit must be a non-negative integer"):
            journal.read(demo_ws, limit=-1)
        with pytest.raises(ValueError, match="offset"):
            journal.read(demo_ws, offset=1.5)
        with pytest.raises(ValueError, match="not both"):
            journal.read(demo_ws, "mark", actions=["note"])
        if not ws_has_db:
            assert journal.read(demo_ws, columns=["id"]).columns.tolist() == ["id"]
            assert journal.count(demo_ws) == 0
            _events(demo_ws, 3)
    assert journal.read(demo_ws, "x' OR '1'='1").empty  # a value is never SQL
    assert journal.count(demo_ws) == 3


def test_dest_reads_one_event(demo_ws):
    ids = _events(demo_ws, 4)
    moved = journal.trash(demo_ws, demo_ws.library / "lion" / "lion_0000.jpg", "test")
    assert journal.dest(demo_ws, moved) == journal.read(demo_ws).set_index("id").loc[moved,
                                                                                       "dest"]
    assert journal.dest(demo_ws, moved).startswith("_trash/")
    with pytest.raises(ZoolibError, match=f"no event {ids[-1] + 99}"):
        journal.dest(demo_ws, ids[-1] + 99)


class _Locked:
    """A connection whose first switches to WAL mode find the file locked."""

    def __init__(self, refusals: int):
        self.refusals, self.mode = refusals, "delete"

    def execute(self, sql):
        import sqlite3

        if sql == "PRAGMA journal_mode=WAL":
            if self.refusals:
                self.refusals -= 1
                raise sqlite3.OperationalError("database is locked")
            self.mode = "wal"
        return self

    def fetchone(self):
        return (self.mode,)


def test_the_wal_switch_is_retried_while_locked():
    from zoolib import db

    con = _Locked(refusals=3)
    db._wal(con, timeout=5)
    assert con.mode == "wal" and con.refusals == 0
    with pytest.raises(Exception, match="locked"):
        db._wal(_Locked(refusals=10**9), timeout=0.1)  # not forever


def test_journal_and_transaction_log_open_the_database_the_same_way(demo_ws, monkeypatch):
    """SQLite does not call its busy handler for the switch of a new file to WAL mode:
    the journal must retry it as the transaction log does (one connect for both)."""
    from zoolib import db, translog

    calls = []
    real = db._wal
    monkeypatch.setattr(db, "_wal", lambda con, timeout: calls.append(timeout) or real(con, timeout))
    journal.connect(demo_ws).close()
    translog.connect(demo_ws).close()
    assert len(calls) == 2


# ----------------------------------------------------------------------------- long names

def test_free_path_cuts_the_stem_to_fit_the_counter(tmp_path):
    import os

    name = "x" + "€" * 83 + ".jpg"  # 254 bytes: "~1" fits only with a cut
    (tmp_path / name).write_bytes(b"x")
    free = journal._free_path(tmp_path / name)
    assert free.name == "x" + "€" * 82 + "~1.jpg"  # a whole 3-byte character cut
    assert len(os.fsencode(free.name)) <= 255
    free.write_bytes(b"y")
    assert journal._free_path(tmp_path / name).name == "x" + "€" * 82 + "~2.jpg"


def test_recover_removes_a_cut_short_partial_copy_of_a_255_byte_name(demo_ws):
    from zoolib.workspace import temp_path

    src = demo_ws.inbox / "camera0" / ("p" * 251 + ".jpg")
    src.write_bytes(b"data")
    dest = demo_ws.library / "lion" / src.name
    event = journal.record(demo_ws, "add_to_library", journal._rel(demo_ws, src),
                           journal._rel(demo_ws, dest), row_first=True)  # killed mid-copy
    partial = temp_path(dest)
    partial.write_bytes(b"da")
    assert journal.recover(demo_ws) and journal.read(demo_ws).iloc[-1]["undoes"] == event
    assert not partial.exists() and src.exists() and not dest.exists()


def test_recover_keeps_a_move_whose_file_moved_on_back_to_its_origin(demo_ws):
    """lion -> zebra -> lion: the first move's destination is empty and its origin full,
    as after a kill, but the move happened; a later event took the file on."""
    from zoolib import curate

    first = curate.relabel(demo_ws, ["lion/lion_0001.jpg"], "zebra")
    curate.relabel(demo_ws, ["zebra/lion_0001.jpg"], "lion")
    assert journal.recover(demo_ws) == []
    assert not journal.read(demo_ws)["undone"].any(), "a move that happened was abandoned"
    assert first
